"""The speaking speed's cost on CPU: FFmpeg's atempo through PyAV (api/tempo.py), whole and streamed, per second of audio. run.py measures, record.py writes the record."""
