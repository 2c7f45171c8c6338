"""backend="layer_parallel" works in a fresh interpreter that never imports lp_fx."""

import subprocess
import sys
import textwrap


def test_backend_name_resolves_without_importing_lp_fx():
    code = textwrap.dedent(
        """
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        f = torch.compile(m, backend="layer_parallel", options={"inner": "eager"})
        x = torch.randn(2, 4)
        assert torch.allclose(f(x), m(x))
        assert "lp_fx.backend" in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
