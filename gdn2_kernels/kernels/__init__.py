"""The Triton kernels, one module per pipeline stage (docs/pipeline.md), their launchers, and the
orchestrators ``chunk_fwd`` / ``chunk_bwd``.

Sequence lengths are runtime values the chunk kernels are not specialised on
(``do_not_specialize`` on ``T``, and on the L2 norm's row count): Triton would otherwise compile a
variant for lengths divisible by 16, one for 1 and one for the rest, so a new prefill length could
compile again. The decode kernel keeps Triton's specialisation of its ``T`` (T = 1 is its hot
case; at most three variants).
"""
