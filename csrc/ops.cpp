// The op schemas, declared once. Each backend only registers kernels for them
// (cpu/gru_cpu.cpp for CPU, cuda/gru_cuda_ops.cpp for CUDA), so a CPU-only build still has every op.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers only (gru_driver.cpp)
#ifndef AT_PER_OPERATOR_HEADERS
#define AT_PER_OPERATOR_HEADERS
#endif

#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cuda/gru_persistent_plan.h"  // plain C++: in every build
#include "gru.h"
#include "schemas.h"
#ifdef GRU_FUSED_WITH_CUDA
#include "cuda/gru_kernel_params.h"
#endif

TORCH_LIBRARY(gru_fused, m) {
  m.def(gru_fused::kForwardSchema);
  m.def(gru_fused::kInferenceSchema);
  m.def(gru_fused::kBackwardSchema);
}

namespace {

// gru_inference where a backend has no kernel of its own for it: gru_forward, workspace
// dropped. The CPU and CUDA both register a kernel that keeps one step's workspace only.
std::tuple<at::Tensor, at::Tensor> gru_inference_any_device(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reset_after, bool reverse) {
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("gru_fused::gru_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, bool, bool)>();
  auto [output, h_n, workspace] = forward.call(input, hx, weight_ih, weight_hh, bias_ih,
                                               bias_hh, lengths, reset_after, reverse);
  return {output, h_n};
}

}  // namespace

TORCH_LIBRARY_IMPL(gru_fused, CompositeExplicitAutograd, m) {
  m.impl("gru_inference", &gru_inference_any_device);
}

// `import gru_fused._C` loads the library above; the module itself reports how it was
// built and manages the memory the kernels keep between calls (gru.h).
static PyObject* py_cached_bytes(PyObject*, PyObject*) {
  return PyLong_FromLongLong(gru_fused::cached_bytes());
}

static PyObject* py_empty_cache(PyObject*, PyObject*) {
  int64_t released = 0;
  Py_BEGIN_ALLOW_THREADS
  released = gru_fused::empty_cache();
#ifdef GRU_FUSED_WITH_CUDA
  gru_fused::empty_cuda_lengths_cache();  // device memory: not in the count
#endif
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(released);
}

// plan_cuda_kernel(direction, scalar_bytes, acc_bytes, H, B, reset_after, kernel,
//   cc_major, cc_minor, sm_count, smem_per_block_optin, cooperative, clusters,
//   max_cluster) -> dict: the CUDA backend's plan for one loop of a call on a device with
// those properties (gru_persistent_plan.h); kernel is GRU_FUSED_CUDA_KERNEL's value, or
// None to read it; max_cluster < 0: the device's default (widest_cluster).
static PyObject* py_plan_cuda_kernel(PyObject*, PyObject* args) {
  using namespace gru_fused::cuda;
  const char *direction = nullptr, *kernel = nullptr;
  long long scalar_bytes = 0, acc_bytes = 0, H = 0, B = 0, smem = 0;
  int reset_after = 1, cooperative = 0, clusters = 0, max_cluster = -1;
  DeviceProps d;
  if (!PyArg_ParseTuple(args, "sLLLLpziiiLppi", &direction, &scalar_bytes, &acc_bytes, &H, &B,
                        &reset_after, &kernel, &d.cc_major, &d.cc_minor, &d.sm_count, &smem,
                        &cooperative, &clusters, &max_cluster)) {
    return nullptr;
  }
  d.smem_per_block_optin = static_cast<size_t>(smem);
  d.cooperative = cooperative != 0;
  d.clusters = clusters != 0;
  d.max_cluster = max_cluster;
  const std::string dir = direction;
  if (dir != "forward" && dir != "backward") {
    PyErr_SetString(PyExc_ValueError, "direction: expected 'forward' or 'backward'");
    return nullptr;
  }
  Plan plan;
  try {
    Choice choice = choice_from_env();
    if (kernel != nullptr) {
      const std::string k = kernel;
      choice = k == "auto" ? Choice::kAuto : k == "step" ? Choice::kStep
             : k == "persistent" ? Choice::kPersistent : k == "cluster" ? Choice::kCluster
             : k == "cooperative" ? Choice::kCooperative
             : throw std::invalid_argument("kernel='" + k + "': expected auto, step, "
                                           "persistent, cluster or cooperative");
    }
    plan = plan_kernel(d, dir == "forward" ? Direction::kForward : Direction::kBackward,
                       size_t(scalar_bytes), size_t(acc_bytes), H, B, reset_after != 0, choice);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  const PersistentShape& g = plan.shape;
  return Py_BuildValue("{s:s,s:i,s:i,s:i,s:i,s:n,s:s}", "family", family_name(plan.family),
                       "cluster", g.cluster, "units", g.units, "rows", g.rows, "clusters",
                       g.clusters, "smem", static_cast<Py_ssize_t>(plan.layout.total), "why",
                       plan.why.c_str());
}

#ifdef GRU_FUSED_WITH_CUDA
// cuda_device_properties(index) -> dict: what the planner reads of CUDA device `index`
// (cuda::device_props), in plan_cuda_kernel's terms, so that gru_fused.cuda_kernel_plan
// reports the plan the kernels start from (a launch the device refuses is planned again
// with narrower clusters, or runs the step kernels).
static PyObject* py_cuda_device_properties(PyObject*, PyObject* args) {
  int index = 0;
  if (!PyArg_ParseTuple(args, "i", &index)) return nullptr;
  gru_fused::cuda::DeviceProps d;
  try {
    d = gru_fused::cuda::device_props(index);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return Py_BuildValue("{s:(ii),s:i,s:n,s:O,s:O,s:i}", "cc", d.cc_major, d.cc_minor,
                       "sm_count", d.sm_count, "smem_per_block_optin",
                       static_cast<Py_ssize_t>(d.smem_per_block_optin), "cooperative",
                       d.cooperative ? Py_True : Py_False, "clusters",
                       d.clusters ? Py_True : Py_False, "max_cluster",
                       gru_fused::cuda::widest_cluster(d));
}
#endif

static PyMethodDef gru_fused_methods[] = {
    {"cached_bytes", py_cached_bytes, METH_NOARGS,
     "Bytes of CPU scratch and workspace memory kept between calls."},
    {"empty_cache", py_empty_cache, METH_NOARGS,
     "Releases the kept CPU memory (and the CUDA copies of lengths no CUDA graph reads); "
     "returns the CPU bytes released."},
    {"plan_cuda_kernel", py_plan_cuda_kernel, METH_VARARGS,
     "The CUDA backend's kernel plan for one loop of a call (gru_persistent_plan.h)."},
#ifdef GRU_FUSED_WITH_CUDA
    {"cuda_device_properties", py_cuda_device_properties, METH_VARARGS,
     "What the CUDA kernel planner reads of a CUDA device (its attributes)."},
#endif
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef gru_fused_module = {
    PyModuleDef_HEAD_INIT, "_C", nullptr, -1, gru_fused_methods, nullptr, nullptr, nullptr,
    nullptr};

#ifdef GRU_FUSED_WITH_CUDA
// The CUDA step kernels' block tiles, as gru_kernel_params.h defines them, for the
// resource report and the performance model (benchmarks/kernel_resources.py,
// perf_model.py): {tile: {gates, units_per_warp, units, rows, chunk, threads,
// smem_float, smem_double}}, the last two the dynamic shared memory of a launch whose
// partial sums are float or double.
template <typename TileT>
static PyObject* tile_info() {
  using namespace gru_fused::cuda;
  return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:n,s:n}", "gates", TileT::kGates,
                       "units_per_warp", TileT::kUnitsPerWarp, "units", TileT::kUnits,
                       "rows", TileT::kRows, "chunk", TileT::kChunk, "threads", kThreads,
                       "smem_float", static_cast<Py_ssize_t>(TileT::template smem_bytes<float>()),
                       "smem_double", static_cast<Py_ssize_t>(TileT::template smem_bytes<double>()));
}

static PyObject* cuda_tiles() {
  using namespace gru_fused::cuda;
  // float and double partial sums use different row counts in the forward's tiles.
  return Py_BuildValue("{s:N,s:N,s:N,s:N,s:N}",
                       "forward_fused[float]", tile_info<ForwardFusedTile<float>>(),
                       "forward_fused[double]", tile_info<ForwardFusedTile<double>>(),
                       "forward_reset[float]", tile_info<ForwardResetTile<float>>(),
                       "forward_reset[double]", tile_info<ForwardResetTile<double>>(),
                       "one_gate", tile_info<OneGateTile>());
}
#endif

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&gru_fused_module);
  if (m == nullptr) return nullptr;
#ifdef GRU_FUSED_WITH_CUDA
  PyModule_AddObject(m, "CUDA_COMPILED", Py_NewRef(Py_True));
  PyModule_AddObject(m, "CUDA_TILES", cuda_tiles());
#else
  PyModule_AddObject(m, "CUDA_COMPILED", Py_NewRef(Py_False));
#endif
  return m;
}
