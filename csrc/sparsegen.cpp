// The one schema block of the sparsegen operator library. Every op is declared here, once, in the list
// below; the Python registry (SCHEMAS in sparsegen_kernels/ops.py, which declares the same schemas when this
// extension is missing) is checked against these by tests/test_ops.py. Each backend adds its kernels in its
// own file with TORCH_LIBRARY_IMPL:
//   csrc/cpu/*.cpp   -> sparsegen, CPU (and the internal _sparsegen_cpu upsample-conv kernels for sparse inputs)
//   csrc/cuda/*.cu   -> _sparsegen_cuda, CUDA: the CUDA C++ providers, internal ops of the same names and
//                       schemas; the public ops' CUDA kernels choose between them and the Triton kernels in
//                       sparsegen_kernels/backend.py
// Autograd, fake (meta) implementations, autocast and typed Python wrappers live in sparsegen_kernels/ops.py.
//
// Conventions shared by all ops (see sparsegen_kernels/reference.py for the executable definition):
//   x: [N, C, H, W]; mode in {"spatial", "channel", "global"}; group g of sample n is
//     spatial: channel c = g, G = C, group size H*W, index inside group = h*W + w
//     channel: position p = g, G = H*W, group size C,  index inside group = c
//     global : g = 0,     G = 1,   group size C*H*W, index inside group = c*H*W + h*W + w
//   Compact form: values [N, G, k] (dtype of x), indices [N, G, k] (int16 if group size <= 32767,
//   else int32), entries of a group in ascending index order.
//   Selection: the k largest of relu?(x + bias[c]) per group; ties go to the lower index.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing sparsegen_kernels._C registers the ops (static initialisers below); the module is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Ops with kernels in C++ (CPU and CUDA): X(name, "(arguments) -> returns").
//   topk_compact      fused relu?(x + bias) + per-group top-k -> values, indices [N, G, k]
//   topk_mask         the same with a dense output (every unselected entry zero), plus the compact indices
//   compact_to_dense  scatter a compact activation into zeros of shape [N, C, H, W]
//   compact_gather    gather dense [N, C, H, W] at compact indices -> [N, G, k]
//   sparse_conv_transpose2d   conv_transpose2d(dense(input), weight [Cin, Cout, kh, kw], bias, ...); with
//                             indices = None, values is a dense [N, C, H, W] input whose zeros are skipped
//   sparse_conv_transpose2d_input_grad   d(out)/d(values) only at the surviving entries -> [N, G, k]
//   sparse_conv_transpose2d_weight_grad  sum over surviving entries of v * grad_out window -> [Cin, Cout, kh, kw]
#define SPARSEGEN_KERNEL_OPS(X)                                                                                  \
  X(topk_compact, "(Tensor x, int k, str mode, Tensor? bias, bool relu) -> (Tensor values, Tensor indices)")   \
  X(topk_mask, "(Tensor x, int k, str mode, Tensor? bias, bool relu) -> (Tensor out, Tensor indices)")         \
  X(compact_to_dense, "(Tensor values, Tensor indices, str mode, SymInt[] shape) -> Tensor")                   \
  X(compact_gather, "(Tensor dense, Tensor indices, str mode) -> Tensor")                                      \
  X(sparse_conv_transpose2d,                                                                                   \
    "(Tensor values, Tensor? indices, str mode, SymInt[] in_shape, Tensor weight, Tensor? bias, int[] stride, " \
    "int[] padding, int[] output_padding) -> Tensor")                                                          \
  X(sparse_conv_transpose2d_input_grad,                                                                        \
    "(Tensor grad_out, Tensor indices, str mode, SymInt[] in_shape, Tensor weight, int[] stride, "             \
    "int[] padding) -> Tensor")                                                                                \
  X(sparse_conv_transpose2d_weight_grad,                                                                       \
    "(Tensor grad_out, Tensor values, Tensor? indices, str mode, SymInt[] in_shape, SymInt[] weight_shape, "   \
    "int[] stride, int[] padding) -> Tensor")

// Ops composed in Python from the ones above (sparsegen_kernels/ops.py and backend.py). The stride-1 conv of a
// dense input that skips its exact zeros, conv2d(input, weight [Cout, Cin, kh, kw], bias, padding) (a transposed
// conv with the flipped, transposed weight, where the input is sparse enough; the dense conv elsewhere), and its
// weight gradient; the upsample-conv,
//   out = conv2d(interpolate(dense(input), scale_factor=2, mode="nearest"), weight, bias, padding=1),
//   weight [Cout, Cin, 3, 3] -> out [N, Cout, 2H, 2W], never materialising the upsampled map (the kernels fold
//   the weight into a stride-2 4x4 transposed conv or, for very sparse inputs, work on the 3x3 weight);
//   its input gradient at the surviving entries -> [N, G, k], and its weight gradient -> [Cout, Cin, 3, 3].
#define SPARSEGEN_COMPOSITE_OPS(X)                                                                               \
  X(sparse_upsample_conv2d,                                                                                    \
    "(Tensor values, Tensor? indices, str mode, SymInt[] in_shape, Tensor weight, Tensor? bias) -> Tensor")   \
  X(sparse_upsample_conv2d_input_grad,                                                                         \
    "(Tensor grad_out, Tensor indices, str mode, SymInt[] in_shape, Tensor weight) -> Tensor")                \
  X(sparse_upsample_conv2d_weight_grad,                                                                        \
    "(Tensor grad_out, Tensor values, Tensor? indices, str mode, SymInt[] in_shape) -> Tensor")                 \
  X(sparse_conv2d, "(Tensor input, Tensor weight, Tensor? bias, int[] padding) -> Tensor")                        \
  X(sparse_conv2d_weight_grad, "(Tensor grad_out, Tensor input, SymInt[] weight_shape, int[] padding) -> Tensor")

#define SPARSEGEN_DEF(name, schema) m.def(#name schema);

TORCH_LIBRARY(sparsegen, m) {
  SPARSEGEN_KERNEL_OPS(SPARSEGEN_DEF)
  SPARSEGEN_COMPOSITE_OPS(SPARSEGEN_DEF)
}

// The CUDA C++ providers: internal, the same names and schemas as the public kernel ops.
TORCH_LIBRARY(_sparsegen_cuda, m) { SPARSEGEN_KERNEL_OPS(SPARSEGEN_DEF) }

// Internal CPU kernels of the upsample-conv on the 3x3 weight for very sparse compact inputs
// (csrc/cpu/upsample_cpu.cpp; sparsegen_kernels/ops.py routes the public upsample-conv ops to them).
TORCH_LIBRARY(_sparsegen_cpu, m) {
  m.def("upsample_conv_direct(Tensor values, Tensor indices, str mode, SymInt[] in_shape, Tensor weight, "
        "Tensor? bias) -> Tensor");
  m.def("upsample_conv_direct_input_grad(Tensor grad_out, Tensor indices, str mode, SymInt[] in_shape, "
        "Tensor weight) -> Tensor");
  m.def("upsample_conv_direct_weight_grad(Tensor grad_out, Tensor values, Tensor indices, str mode, "
        "SymInt[] in_shape) -> Tensor");
}
