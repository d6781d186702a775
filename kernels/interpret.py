"""Running the Triton kernels on a CPU through Triton's interpreter
(TRITON_INTERPRET=1), for correctness tests on machines without a GPU.

Triton 3.6's interpreter converts loop bounds with int(ndarray of shape (1,)),
which NumPy >= 2.4 refuses; `patch_interpreter()` makes that conversion take
the array's single element. It changes nothing for compiled (GPU) kernels.
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
    interpreter._ziggurat_patched = True
