"""Signals: the first Ctrl-C or SIGTERM in a loop over batches only asks it to stop; a second stops at once."""
import os
import signal

import pytest

from neurostore.signals import StopAtBatchEnd, sigterm_exits


@pytest.mark.parametrize("sig, stop", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_the_first_signal_asks_the_second_stops(sig, stop):
    with StopAtBatchEnd() as s:
        os.kill(os.getpid(), sig)
        assert s.asked == sig and not s.now           # asked; the loop goes on to its batch's end
        with pytest.raises(stop):
            os.kill(os.getpid(), sig)
        assert s.now
        e = s.stop()
        assert isinstance(e, stop) and (stop is KeyboardInterrupt or e.code == 128 + sig)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_exits_where_the_work_is():
    ran = []
    with pytest.raises(SystemExit) as e:
        with sigterm_exits():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            finally:
                ran.append("cleanup")
    assert e.value.code == 143 and ran == ["cleanup"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
