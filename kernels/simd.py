"""A SIMD vector of 16 float32 lanes for Numba kernels: what a BLAS micro-kernel is written in.

Numba compiles scalar loops, and LLVM turns them into SIMD code as it sees fit. For the
prefill matrix product it sees fit badly: it makes each running sum of a register tile a
256-bit vector of partial sums over `in`, and OpenBLAS stays 20-40 % ahead. BLAS kernels are
written the other way round, as an outer product: one vector holds 16 *different* outputs
(here 16 token rows of one output column), and each step multiplies it by a single weight,
broadcast to every lane. Nothing is summed across lanes, and a loaded vector feeds as many
multiply-adds as there are weight rows in the tile. The int8 decode kernel uses the same
vectors to widen 16 weights at once and scale them by their block's scale.

LLVM has vector types; Numba does not expose them, so this file adds one, `float32x16`
(LLVM's <16 x float>, one AVX-512 register), with the few operations the kernels need.
Each is a Numba `intrinsic`: a few lines of LLVM IR, inlined where they are called, so a
loop over them compiles to the same instructions as a hand-written C kernel (vbroadcastss,
vfmadd231ps on zmm registers). On a CPU without AVX-512 LLVM splits each vector into two
(AVX2) or four (ARM NEON) registers: the same numbers everywhere, fastest with AVX-512.

Numba's on-disk cache keys each kernel on the content of its own file, so numba_kernels.py
holds the start of this file's sha256 (`SIMD_SOURCE`): after a change here, the tests say the
new value to put there, and the kernels recompile.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
_VECTOR = ir.VectorType(ir.FloatType(), LANES)
_INT32 = ir.IntType(32)


class Float32x16(types.Type):
    """The Numba type of a vector of 16 float32 lanes (a value, like a float: no memory)."""

    def __init__(self):
        super().__init__(name="float32x16")


float32x16 = Float32x16()


@register_model(Float32x16)
class _Float32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR)


def _address(context, builder, array_type, array, indices):
    """A pointer to array[indices] (no bounds check: the kernels keep to their arrays)."""
    data = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, data, indices)


@intrinsic
def zeros(typingctx):
    """A vector of 16 zeros: where a running sum starts."""

    def codegen(context, builder, signature, args):
        return ir.Constant(_VECTOR, None)  # LLVM's zeroinitializer

    return float32x16(), codegen


@intrinsic
def load(typingctx, array, row, column):
    """array[row, column : column + 16] of a C-contiguous float32 [rows, columns] array."""
    if not (isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C"
            and array.dtype == types.float32):
        return None  # 16 neighbours in memory only in a C-contiguous array: others do not compile

    def codegen(context, builder, signature, args):
        address = _address(context, builder, signature.args[0], args[0], args[1:])
        return builder.load(builder.bitcast(address, _VECTOR.as_pointer()), align=4)

    return float32x16(array, row, column), codegen


@intrinsic
def load_int8(typingctx, array, row, column):
    """array[row, column : column + 16] of a C-contiguous int8 array, widened to float32
    (exactly: every int8 is a float32). On x86 one vpmovsxbd and one vcvtdq2ps."""
    if not (isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C" and array.dtype == types.int8):
        return None

    def codegen(context, builder, signature, args):
        address = _address(context, builder, signature.args[0], args[0], args[1:])
        int8s = builder.load(builder.bitcast(address, ir.VectorType(ir.IntType(8), LANES).as_pointer()), align=1)
        return builder.sitofp(int8s, _VECTOR)

    return float32x16(array, row, column), codegen


@intrinsic
def multiply(typingctx, a, b):
    """a * b, lane by lane."""
    if a != float32x16 or b != float32x16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fmul(*args)

    return float32x16(float32x16, float32x16), codegen


@intrinsic
def sum_lanes(typingctx, vector):
    """The sum of the 16 lanes, added pairwise: halves, then quarters... (4 vector adds)."""
    if vector != float32x16:
        return None

    def codegen(context, builder, signature, args):
        (total,) = args
        width = LANES
        while width > 1:
            width //= 2
            low = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(_INT32, width), list(range(width))))
            high = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(_INT32, width),
                                                                    list(range(width, 2 * width))))
            total = builder.fadd(low, high)
        return builder.extract_element(total, _INT32(0))

    return types.float32(float32x16), codegen


@intrinsic
def multiply_add(typingctx, scalar, vector, acc):
    """acc + scalar * vector in every lane, as one fused multiply-add (llvm.fma)."""
    if scalar != types.float32:
        return None

    def codegen(context, builder, signature, args):
        scalar, vector, acc = args
        lane0 = builder.insert_element(ir.Constant(_VECTOR, ir.Undefined), scalar, _INT32(0))
        broadcast = builder.shuffle_vector(lane0, ir.Constant(_VECTOR, ir.Undefined),
                                           ir.Constant(ir.VectorType(_INT32, LANES), None))  # lane 0 everywhere
        return _fma(builder, broadcast, vector, acc)

    return float32x16(types.float32, float32x16, float32x16), codegen


@intrinsic
def multiply_add_lanes(typingctx, a, b, acc):
    """acc + a * b, lane by lane, as one fused multiply-add (llvm.fma)."""
    if a != float32x16 or b != float32x16 or acc != float32x16:
        return None

    def codegen(context, builder, signature, args):
        return _fma(builder, *args)

    return float32x16(float32x16, float32x16, float32x16), codegen


def _fma(builder, a, b, acc):
    """LLVM IR for acc + a * b on vectors, rounded once (llvm.fma: vfmadd on AVX-512)."""
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VECTOR, [_VECTOR] * 3), "llvm.fma.v16f32")
    return builder.call(fma, [a, b, acc])


@intrinsic
def store_column(typingctx, out, row, column, vector, count):
    """out[row + lane, column] = vector[lane] for the first `count` lanes (count <= 16): a
    vector of 16 token rows of one output column, written down that column."""
    if not (isinstance(out, types.Array) and out.ndim == 2 and out.dtype == types.float32):
        return None

    def codegen(context, builder, signature, args):
        out, row, column, vector, count = args
        row_type = signature.args[1]
        for lane in range(LANES):
            with builder.if_then(builder.icmp_signed(">", count, ir.Constant(count.type, lane))):
                lane_row = builder.add(row, context.get_constant(row_type, lane))
                address = _address(context, builder, signature.args[0], out, [lane_row, column])
                builder.store(builder.extract_element(vector, _INT32(lane)), address)
        return context.get_dummy_value()

    return types.void(out, row, column, float32x16, count), codegen
