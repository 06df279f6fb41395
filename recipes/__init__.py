# Makes `recipes` a regular package so that `tune run recipes/<name>.py` (which torchtune turns
# into the module `recipes.<name>`) finds this folder; see docs/tune_run.md.
