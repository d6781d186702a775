"""Running the Triton kernels on a CPU through Triton's interpreter
(TRITON_INTERPRET=1), for correctness tests on machines without a GPU.

Triton 3.6's interpreter converts loop bounds with int(ndarray of shape (1,)),
which NumPy >= 2.4 refuses; `patch_interpreter()` makes that conversion take
the array's single element. Its float -> fp8 (e4m3) cast drops the carry when
rounding up crosses a power of two (7.86 becomes 4.0, not 8.0): casts to e4m3
go through torch's (round to nearest even, as the GPU's cvt.rn does).
It changes nothing for compiled (GPU) kernels.
"""

from __future__ import annotations


def patch_interpreter() -> None:
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    if getattr(interpreter, "_ziggurat_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    _patch_fp8_cast(interpreter)
    interpreter._ziggurat_patched = True


def _patch_fp8_cast(interpreter) -> None:
    import numpy as np
    import torch
    import triton.language as tl

    convert = interpreter._convert_float
    wide = {tl.float32: np.float32, tl.float16: np.float16}

    def fixed(input, input_dtype, output_dtype, rounding_mode):
        if output_dtype == tl.float8e4nv and input_dtype in wide:
            x = torch.from_numpy(np.ascontiguousarray(input.view(wide[input_dtype])).astype(np.float32))
            return x.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(input.shape)
        return convert(input, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = fixed
