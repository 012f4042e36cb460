"""The zygote's side: the modules the forkserver preloads (preload.py for every
engine, model.py for the VibeVoice stack) and probe.py, which reports from a forked
child what it inherited. Importing this package preloads nothing."""
