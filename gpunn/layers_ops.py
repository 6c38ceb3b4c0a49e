"""Numeric helpers for the layers beyond Dense, on either backend.

Most of the new layers are a handful of whole-array operations written with
the backend's array module (``backend.xp``: NumPy, or CuPy on a GPU).  Two
things need more than that:

* the derivative of an activation on its own (the ``Activation`` layer's
  backward): the compiled CPU pass on the NumPy backend, gpunn's CUDA kernel
  on the CUDA backend -- both use the activation's one definition in
  :mod:`gpunn.opmath`;
* random numbers for ``GaussianNoise``, reproducible under
  ``gpunn.set_seed`` and resumable (``Dropout``'s mask is a counter-based
  draw of its own, see ``Backend.dropout``): on the CPU each training step draws from
  a stream keyed by (the layer's seed, the step number), so a run resumed
  from a saved model draws what the uninterrupted run would have (on a GPU,
  CuPy's generator, restarted from (seed, step) whenever steps are not consecutive).
"""

from __future__ import annotations

import numpy as np

from gpunn.backend import cpu_fused


def activation_backward(backend, dy, y, z, act, alpha, dx):
    """``dx = dy * act'(.)`` (B, N); y is the forward's output, z its input."""
    code = act
    # a stand-in backend (a timing proxy) may lack ``name``: its array module tells the host
    name = getattr(backend, "name", None) or ("numpy" if backend.xp is np else "cuda")
    if name == "numpy":
        cpu_fused.activation_grad(dx, dy, y, z, code, dy.dtype.type(alpha), dx[0], False)
        return dx
    from gpunn import kernels
    from gpunn._cuda import launch_stream

    kernels.activation_backward(dy, y, z, code, alpha, dx, stream=launch_stream())
    return dx


def normal(backend, seed, step, out):
    """Fill ``out`` with standard normal draws for training step ``step`` of a layer seeded ``seed``."""
    xp = backend.xp
    if xp is np:
        np.random.default_rng([seed, step]).standard_normal(out=out.reshape(-1), dtype=out.dtype.type)
        return out
    out[...] = _device_generator(xp, seed, step).standard_normal(out.shape, dtype=out.dtype)
    return out


#: per layer seed, the device generator and the step it will draw for next: on a GPU making a
#: generator per step would cost more than the draw, so consecutive steps continue one stream and
#: any other step (a new run, a replay, a resumed model) starts the stream keyed by (seed, step)
_DEVICE_GENERATORS: dict = {}


def _device_generator(xp, seed, step):
    key = (id(xp), seed)
    gen, next_step = _DEVICE_GENERATORS.get(key, (None, None))
    if gen is None or next_step != step:
        if len(_DEVICE_GENERATORS) > 256:
            _DEVICE_GENERATORS.clear()
        mixed = int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint32)[0])
        gen = xp.random.RandomState(mixed)
    _DEVICE_GENERATORS[key] = (gen, step + 1)
    return gen


def draw_seed():
    """A fresh layer seed from gpunn's generator (so ``set_seed`` fixes it)."""
    from gpunn.random import generator

    return int(generator().integers(0, 2**31 - 1))
