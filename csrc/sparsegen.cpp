// The one schema block of the sparsegen operator library. Every op is declared here, once;
// each backend adds its kernels in its own file with TORCH_LIBRARY_IMPL(sparsegen, <Key>, m):
//   csrc/cpu/*.cpp   -> CPU
//   csrc/cuda/*.cu   -> CUDA (the *_cuda provider ops; the public ops' CUDA kernels are chosen in
//                       sparsegen_kernels/backend.py between these and the Triton kernels)
// Autograd, fake (meta) implementations and typed Python wrappers live in sparsegen_kernels/ops.py.
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

TORCH_LIBRARY(sparsegen, m) {
  // ---- selection ------------------------------------------------------------------------------
  m.def("topk_compact(Tensor x, int k, str mode, Tensor? bias, bool relu) -> (Tensor values, Tensor indices)");
  // Dense output with every unselected entry zero; also returns the compact indices (for backward
  // and for reading out parse graphs without a second pass).
  m.def("topk_mask(Tensor x, int k, str mode, Tensor? bias, bool relu) -> (Tensor out, Tensor indices)");

  // ---- layout ---------------------------------------------------------------------------------
  // Scatter a compact activation into a dense [N, C, H, W] tensor of zeros (shape = [N, C, H, W]).
  m.def("compact_to_dense(Tensor values, Tensor indices, str mode, SymInt[] shape) -> Tensor");
  // Gather dense[N, C, H, W] at compact indices -> [N, G, k].
  m.def("compact_gather(Tensor dense, Tensor indices, str mode) -> Tensor");

  // ---- sparse transposed convolution ------------------------------------------------------------
  // out = conv_transpose2d(dense(input), weight, bias, stride, padding, output_padding),
  // weight [Cin, Cout, kh, kw]. With indices = None, `values` is a dense [N, C, H, W] input whose
  // zeros are skipped (mode is then ignored). in_shape = [N, Cin, H, W].
  m.def(
      "sparse_conv_transpose2d(Tensor values, Tensor? indices, str mode, SymInt[] in_shape, Tensor weight, "
      "Tensor? bias, int[] stride, int[] padding, int[] output_padding) -> Tensor");
  // d(out)/d(values) only at the surviving entries: grad_out [N, Cout, Ho, Wo] -> [N, G, k].
  m.def(
      "sparse_conv_transpose2d_input_grad(Tensor grad_out, Tensor indices, str mode, SymInt[] in_shape, "
      "Tensor weight, int[] stride, int[] padding) -> Tensor");
  // d(out)/d(weight) = sum over surviving entries of v * grad_out window -> [Cin, Cout, kh, kw].
  // indices = None: dense input, zeros skipped.
  m.def(
      "sparse_conv_transpose2d_weight_grad(Tensor grad_out, Tensor values, Tensor? indices, str mode, "
      "SymInt[] in_shape, SymInt[] weight_shape, int[] stride, int[] padding) -> Tensor");

  // ---- sparse upsample convolution --------------------------------------------------------------
  // out = conv2d(interpolate(dense(input), scale_factor=2, mode="nearest"), weight, bias, padding=1),
  // weight [Cout, Cin, 3, 3] (Conv2d layout) -> out [N, Cout, 2H, 2W], never materialising the upsampled
  // map. Kernels either fold the weight into a stride-2 4x4 transposed conv or, for very sparse inputs,
  // work on the 3x3 weight directly. indices = None: dense input, zeros skipped.
  m.def(
      "sparse_upsample_conv2d(Tensor values, Tensor? indices, str mode, SymInt[] in_shape, Tensor weight, "
      "Tensor? bias) -> Tensor");
  // d(out)/d(values) at the surviving entries only: grad_out [N, Cout, 2H, 2W] -> [N, G, k].
  m.def(
      "sparse_upsample_conv2d_input_grad(Tensor grad_out, Tensor indices, str mode, SymInt[] in_shape, "
      "Tensor weight) -> Tensor");
  // d(out)/d(weight) summed over the surviving entries -> [Cout, Cin, 3, 3].
  m.def(
      "sparse_upsample_conv2d_weight_grad(Tensor grad_out, Tensor values, Tensor? indices, str mode, "
      "SymInt[] in_shape) -> Tensor");

  // ---- CUDA C++ providers (kernels in csrc/cuda; same semantics as the ops above) ----------------
  m.def("topk_compact_cuda(Tensor x, int k, str mode, Tensor? bias, bool relu) -> (Tensor values, Tensor indices)");
  m.def("topk_mask_cuda(Tensor x, int k, str mode, Tensor? bias, bool relu) -> (Tensor out, Tensor indices)");
  m.def("compact_to_dense_cuda(Tensor values, Tensor indices, str mode, SymInt[] shape) -> Tensor");
  m.def("compact_gather_cuda(Tensor dense, Tensor indices, str mode) -> Tensor");
  m.def(
      "sparse_conv_transpose2d_cuda(Tensor values, Tensor? indices, str mode, SymInt[] in_shape, Tensor weight, "
      "Tensor? bias, int[] stride, int[] padding, int[] output_padding) -> Tensor");
  m.def(
      "sparse_conv_transpose2d_input_grad_cuda(Tensor grad_out, Tensor indices, str mode, SymInt[] in_shape, "
      "Tensor weight, int[] stride, int[] padding) -> Tensor");
  m.def(
      "sparse_conv_transpose2d_weight_grad_cuda(Tensor grad_out, Tensor values, Tensor? indices, str mode, "
      "SymInt[] in_shape, SymInt[] weight_shape, int[] stride, int[] padding) -> Tensor");
}
