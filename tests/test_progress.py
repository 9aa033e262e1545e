"""Progress bars in a log (stderr not a terminal): no cursor codes, however many bars run at once."""
import subprocess
import sys

SCRIPT = """
from neurostore.progress import bar
a, b = bar(50, "first"), bar(50, "second", unit="img")
for _ in range(50):
    a.update(1); b.update(1)
a.close(); b.close()
for _ in bar(None, "third", items=range(3)):
    pass
with bar(3, "off", enabled=False) as c:
    c.update(3)
"""


def test_bars_at_once_write_no_cursor_codes_into_a_log():
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    assert "\x1b[" not in p.stderr                       # tqdm moves the cursor up for a second bar
    assert "first" in p.stderr and "second" in p.stderr and "third" in p.stderr
    assert "off" not in p.stderr and p.stdout == ""
