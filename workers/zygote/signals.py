"""The zygote's first preload: it ignores the stop signals, as every worker does.

A terminal's Ctrl+C, `kill -TERM -- -PGID`, systemd's stop and a closed terminal
signal the launch's whole process group, the zygote with it. The parent stops
the zygote itself when it stops (and a worker forked from it sets the same
dispositions), so the signal must not kill it first: that read as a crash ("the
zygote died"), and a new zygote warmed up while the server stopped. The standard
library's forkserver already ignores SIGINT. Imported only by the forkserver
(vibevoice_pool/pool/zygote.py names it first in the preload list).
"""

import signal

for _sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, signal.SIG_IGN)
