"""torch.compile(fastvae.VAE(...), fullgraph=True) as the first thing a fresh process does.

The forward looks its objective up by name; the first lookup used to import the built-ins and
scan entry points, which Dynamo refuses, so the compiled call failed unless something had looked
an objective up before. Only a fresh process shows that, hence the subprocess.
"""

import subprocess
import sys

SCRIPT = """
import torch
import fastvae

model = fastvae.VAE((784,), latent_dim=8)
compiled = torch.compile(model, fullgraph=True)
x = torch.bernoulli(torch.full((4, 784), 0.3))
out = compiled(x)
out.loss.backward()
assert torch.isfinite(out.loss), out.loss
assert all(p.grad is not None for p in model.parameters())
print("compiled-first-call-ok")
"""


def test_compile_fullgraph_is_the_first_call_of_a_fresh_process():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled-first-call-ok" in result.stdout
