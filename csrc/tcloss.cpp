// Schemas of every native op (TORCH_LIBRARY) and the Python module stub that makes
// `import tcloss._C` load this library. Kernels are registered per device in each op's folder
// (<op>/<op>_cpu.cpp, <op>/<op>_cuda.cu); autograd and fake (meta) implementations are
// registered from Python (tcloss/_backends/<op>.py).
#include <Python.h>
#include <torch/library.h>

// `import tcloss._C` only has to load the shared object: the ops register themselves
// with the dispatcher through static initialisers. No pybind11 needed. PyMODINIT_FUNC exports
// the symbol despite -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tcloss native kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(tcloss, m) {
  // Fused temporal loss, eq. 1. mask_mode: 0 signed_sum, 1 l1, 2 l2. reduction: 0 none,
  // 1 mean, 2 sum. The forward returns the loss; the backward recomputes the per-pixel terms
  // and returns the gradients asked for, already multiplied by grad (dL/dloss), the others as
  // empty (0,) tensors.
  m.def(
      "temporal_loss_fwd(Tensor pred_t, Tensor pred_tk, Tensor flow, Tensor img_t, Tensor img_tk, "
      "bool on_prob, int mask_mode, float mask_power, bool zeros_padding, int reduction) -> Tensor");
  m.def(
      "temporal_loss_bwd(Tensor grad, Tensor pred_t, Tensor pred_tk, Tensor flow, Tensor img_t, "
      "Tensor img_tk, bool on_prob, int mask_mode, float mask_power, bool zeros_padding, "
      "int reduction, bool grad_pred_t, bool grad_pred_tk, bool grad_flow) -> (Tensor, Tensor, Tensor)");
  // Blocked pair-wise similarity loss (SF pair-wise / PF, eq. 2): inputs (B,C,N) student a,
  // teacher a, student b, teacher b; loss: 0 mse, 1 kl. Returns the scalar loss and the per-row
  // statistics kept for backward ((B,Na,2) log-sum-exps for kl, (0,) for mse). Backward
  // recomputes the tiles and returns d student_a, d student_b ((0,) where not requested).
  m.def(
      "pairwise_similarity_loss_fwd(Tensor student_a, Tensor teacher_a, Tensor student_b, Tensor teacher_b, "
      "int loss, float temperature, float eps, bool detach_norm) -> (Tensor, Tensor)");
  m.def(
      "pairwise_similarity_loss_bwd(Tensor grad, Tensor student_a, Tensor teacher_a, Tensor student_b, "
      "Tensor teacher_b, Tensor stats, int loss, float temperature, float eps, bool detach_norm, "
      "bool grad_a, bool grad_b) -> (Tensor, Tensor)");
  // Fused pointwise ConvLSTM cell, eq. 6 (supplement). gates (B,4Hd,h,w) in order i, f, g, o;
  // c (B,Hd,h,w) of the same dtype; peephole (3,Hd,h,w) = (w_i, w_f, w_o) in the accumulation
  // dtype (float32, float64 for float64). fwd -> (h_new, c_new). bwd recomputes the gates from
  // `gates` (nothing else is saved) -> (grad_gates, grad_c, grad_peephole summed over the batch,
  // an empty (0,) tensor unless grad_peephole). Absent upstream gradients count as zeros.
  m.def("convlstm_cell_fwd(Tensor gates, Tensor c, Tensor? peephole) -> (Tensor, Tensor)");
  m.def(
      "convlstm_cell_bwd(Tensor? grad_h, Tensor? grad_c_new, Tensor gates, Tensor c, Tensor? peephole, "
      "bool grad_peephole) -> (Tensor, Tensor, Tensor)");
}
