"""Triton kernels for fastcurv's ops: the GPU fast path (and, under ``TRITON_INTERPRET=1``, a CPU
correctness path).

One module per op, each exposing the two launchers the op registration calls
(``fastcurv/ops/_register.py``)::

    fastcurv.triton.per_example_sqnorm.forward(a, delta, bias) -> Tensor[B]
    fastcurv.triton.per_example_sqnorm.backward(grad, a, delta, bias) -> (grad_a, grad_delta)
    fastcurv.triton.per_example_gram.forward(a, delta, bias) -> Tensor[B, B]
    fastcurv.triton.per_example_gram.backward(grad, a, delta, bias) -> (grad_a, grad_delta)

``a`` is ``[B, T, d_in]``, ``delta`` ``[B, T, d_out]`` (any strides). Semantics are exactly those of
:mod:`fastcurv.reference`. These modules hold no autograd logic. The submodules import ``triton``
on first use, so importing this package never fails when Triton is missing.

Environment: ``FASTCURV_TRITON_FP64_DOT=0`` makes float64 inputs use an elementwise-multiply +
``tl.sum`` contraction instead of ``tl.dot`` (for targets whose Triton cannot lower a float64
``tl.dot``); it is slower but exact to float64 rounding.
"""
