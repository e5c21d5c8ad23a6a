"""Run one %%dreamer_step in a fresh process (a stand-in for a kernel), for crash and concurrency tests.

Usage: python _run_step.py OUTPUT_FOLDER "NAME [options]" CELL_FILE [SETUP_CODE]
"""

import sys

from IPython.core.interactiveshell import InteractiveShell

output, line, cell_file = sys.argv[1:4]
setup = sys.argv[4] if len(sys.argv) > 4 else ""
ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "dreamer_magic")
ip.run_line_magic("dreamer", f"output {output}")
if setup:
    exec(setup, ip.user_ns)
with open(cell_file) as f:
    cell = f.read()
ip.run_cell_magic("dreamer_step", line, cell)
print("STATE:", ip._dreamer_magics._last_status.state, flush=True)
