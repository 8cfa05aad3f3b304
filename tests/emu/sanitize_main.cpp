// Runs every CUDA kernel of csrc/cuda/gru_kernels.cuh and gru_persistent.cuh through the
// emulation layer (csrc/emu/cuda_emu.h), with no torch at all, so the whole program can be
// built with -fsanitize=address or -fsanitize=thread. tests/test_emulation.py builds and
// runs it:
//   - clean: both sanitizers must stay silent and every check below must pass;
//   - with -DGRU_FAULT_MISSING_BARRIER, ThreadSanitizer must report a data race;
//   - with -DGRU_FAULT_OFF_BY_ONE, AddressSanitizer must report an overflow;
//   - with -DGRU_FAULT_CROSS_BLOCK_RACE (one block overwrites what other blocks of the
//     same launch read), ThreadSanitizer must report a data race: the emulator runs the
//     blocks of a launch concurrently;
//   - with -DGRU_FAULT_DIVERGENT_BARRIER (threads of a partial tile return before the
//     matmul's barriers), the emulator's barrier must fail the launch; this program then
//     prints "launch failed: <why>" and exits with 3;
//   - with -DGRU_FAULT_MISSING_CLUSTER_BARRIER (the cluster forward's barrier at the end
//     of a step removed: a CTA reads the states its peers are still writing into its
//     shared memory), -DGRU_FAULT_MISSING_GRID_BARRIER (the cooperative forward's grid
//     barrier removed: CTAs read h from global memory while others write it) or
//     -DGRU_FAULT_MISSING_TILE_BARRIER (no barrier between a persistent CTA's tiles: the
//     next tile's matmul overwrites the scratch the last one's finishers read),
//     ThreadSanitizer must report a data race;
//   - with -DGRU_FAULT_DSMEM_RANK (the cluster exchange writes one rank past the
//     cluster), the emulator must fail the launch (exit 3).
// Options: --quick (see `quick` below), --family (`run_cluster`).
// The persistent kernels run (float) in both families, cluster and cooperative, as
// gru_persistent_plan.h plans them for the emulated device (an sm_90 of GRU_EMU_SM_COUNT
// SMs, 16 by default), and must give the step kernels' results bit for bit: they run
// the same tiles in the same order.
// Every buffer is its own exactly-sized allocation, so an overrun leaves it.
//
// Checks: the forward output against a direct scalar implementation of the formulas,
// the backward (dL/dgi, dL/dhx, dL/dW_hh, dL/db_hn) against central finite differences
// of that implementation along a random direction (float64), and that the results do
// not depend on the order of the blocks (GRU_EMU_SEED's order and another one give the
// same bits; not with --quick).
//
// What this cannot see: anything the emulator does not model (warps, the GPU's weak
// memory ordering, timing, registers' limit on co-residency; see cuda_emu.h), and races
// between blocks of a plain launch that run in different waves (a persistent launch's
// blocks are all co-resident, in one wave).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include "cuda/gru_persistent.cuh"

using namespace gru_fused::cuda;
using gru_fused::kSlotHn;

namespace {

struct Problem {
  int T, B, H;
  bool reset_after, reverse, lengths;
};

struct Inputs {
  std::vector<double> gi, hx, w, b_hn;  // [T,B,3H], [B,H], [3H,H], [H]
  std::vector<int64_t> len;             // [B]
};

int failures = 0;
// --quick (ThreadSanitizer): no second run in another block order, and the persistent
// kernels only in the variants whose reverse equals lengths (both formulas).
bool quick = false;
// --family F: the persistent families run beside the step kernels (cluster, cooperative
// or all; none: the step kernels only), for a planted fault's run.
bool run_cluster = true, run_cooperative = true;

void expect(bool ok, const char* what, const Problem& p, double err) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: T=%d B=%d H=%d reset_after=%d reverse=%d lengths=%d err=%g\n", what,
                p.T, p.B, p.H, p.reset_after, p.reverse, p.lengths, err);
  }
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// The formulas written out directly (independent of gru_math.h). Returns
// L = sum(go * output) + sum(gh * h_n).
double reference_loss(const Problem& p, const Inputs& in, const std::vector<double>& go,
                      const std::vector<double>& gh, std::vector<double>* output) {
  const int T = p.T, B = p.B, H = p.H;
  std::vector<double> h(in.hx), next(B * H), out(T * B * H);
  for (int i = 0; i < T; ++i) {
    const int t = p.reverse ? T - 1 - i : i;
    for (int b = 0; b < B; ++b) {
      std::vector<double> r(H), z(H), rh(H);
      const double* g = &in.gi[(t * B + b) * 3 * H];
      for (int j = 0; j < H; ++j) {
        double ar = g[j], az = g[H + j];
        for (int k = 0; k < H; ++k) {
          ar += in.w[j * H + k] * h[b * H + k];
          az += in.w[(H + j) * H + k] * h[b * H + k];
        }
        r[j] = sigmoid(ar);
        z[j] = sigmoid(az);
        rh[j] = r[j] * h[b * H + j];
      }
      for (int j = 0; j < H; ++j) {
        double hn = p.reset_after ? in.b_hn[j] : 0.0;
        for (int k = 0; k < H; ++k)
          hn += in.w[(2 * H + j) * H + k] * (p.reset_after ? h[b * H + k] : rh[k]);
        const double n = std::tanh(g[2 * H + j] + (p.reset_after ? r[j] * hn : hn));
        const bool active = !p.lengths || t < in.len[b];
        next[b * H + j] = active ? (1 - z[j]) * n + z[j] * h[b * H + j] : h[b * H + j];
      }
    }
    h = next;
    for (int e = 0; e < B * H; ++e) out[t * B * H + e] = h[e];
  }
  double loss = 0;
  for (size_t e = 0; e < out.size(); ++e) loss += go[e] * out[e];
  for (int e = 0; e < B * H; ++e) loss += gh[e] * h[e];
  if (output) *output = out;
  return loss;
}

template <typename S>
std::vector<S> cast(const std::vector<double>& v) {
  return std::vector<S>(v.begin(), v.end());
}

template <typename S>
void check(const Problem& p, const Inputs& in, std::mt19937& rng) {
  const int T = p.T, B = p.B, H = p.H, G = 3 * H;
  std::normal_distribution<double> normal;
  auto randn = [&](size_t n) {
    std::vector<double> v(n);
    for (auto& x : v) x = normal(rng);
    return v;
  };
  const std::vector<double> go = randn(T * B * H), gh = randn(B * H);

  // Kernel inputs and outputs, each its own exact allocation.
  std::vector<S> gi = cast<S>(in.gi), hx = cast<S>(in.hx), w = cast<S>(in.w);
  std::vector<S> b_hn = cast<S>(in.b_hn), go_s = cast<S>(go), gh_s = cast<S>(gh);
  std::vector<S> w_t(G * H);  // W_hh^T [H, 3H], which the backward reads
  for (int row = 0; row < G; ++row)
    for (int k = 0; k < H; ++k) w_t[k * G + row] = w[row * H + k];
  struct Results {
    std::vector<S> out, ws, dG, dGh, grad_hx, dh_direct;
  };
  // Forward and backward on the kernels of `family`; the blocks of every launch in the
  // order the emulator draws (from GRU_EMU_SEED), or from `seed` if not 0.
  auto run = [&](uint64_t seed, Family family) {
    if (seed != 0) gru_emu::set_seed(seed);
    Results r{std::vector<S>(T * B * H), std::vector<S>(4 * T * B * H),
              std::vector<S>(T * B * G), std::vector<S>(p.reset_after ? T * B * G : 0),
              std::vector<S>(B * H), std::vector<S>(B * H)};
    ForwardParams<S> fp{};
    fp.gi = gi.data();
    fp.hx = hx.data();
    fp.w_hh = w.data();
    fp.b_hn = p.reset_after ? b_hn.data() : nullptr;
    fp.lengths = p.lengths ? in.len.data() : nullptr;
    fp.output = r.out.data();
    fp.workspace = r.ws.data();
    fp.T = T;
    fp.B = B;
    fp.H = H;
    fp.ws_steps = T;
    fp.reverse = p.reverse;
    BackwardParams<S, S> bp{};
    bp.grad_output = go_s.data();
    bp.grad_h_n = gh_s.data();
    bp.hx = hx.data();
    bp.w_hh_t = w_t.data();
    bp.output = r.out.data();
    bp.workspace = r.ws.data();
    bp.dG = r.dG.data();
    bp.dGh = p.reset_after ? r.dGh.data() : r.dG.data();
    bp.dh_direct = r.dh_direct.data();
    bp.grad_hx = r.grad_hx.data();
    bp.T = T;
    bp.B = B;
    bp.H = H;
    bp.reverse = p.reverse;
    if (family == Family::kStep) {
      if (p.reset_after) {
        forward_steps<S, S, true>(fp, nullptr);
        backward_steps<S, S, true>(bp, nullptr);
      } else {
        forward_steps<S, S, false>(fp, nullptr);
        backward_steps<S, S, false>(bp, nullptr);
      }
    } else {
      const DeviceProps device = gru_emu::device_props<DeviceProps>();
      const Choice choice = family == Family::kCluster ? Choice::kCluster : Choice::kCooperative;
      const Plan fwd = plan_kernel(device, Direction::kForward, sizeof(S), sizeof(S), H, B,
                                   p.reset_after, choice);
      const Plan bwd = plan_kernel(device, Direction::kBackward, sizeof(S), sizeof(S), H, B,
                                   p.reset_after, choice);
      if (fwd.family != family || bwd.family != family) {
        throw std::runtime_error(std::string("no ") + family_name(family) + " plan: " + fwd.why +
                                 " / " + bwd.why);
      }
      const bool ran = p.reset_after ? forward_persistent<S, S, true>(fp, fwd, nullptr) &&
                                           backward_persistent<S, S, true>(bp, bwd, nullptr)
                                     : forward_persistent<S, S, false>(fp, fwd, nullptr) &&
                                           backward_persistent<S, S, false>(bp, bwd, nullptr);
      if (!ran) throw std::runtime_error(std::string(family_name(family)) + " launch refused");
    }
    if (seed != 0) gru_emu::clear_seed();
    return r;
  };
  const Results res = run(0, Family::kStep);
  const std::vector<S>&out = res.out, &ws = res.ws, &dG = res.dG, &dGh = res.dGh,
                        &grad_hx = res.grad_hx;
  // Another block order gives the same bits: every output element has one writer
  // that sums in a fixed order, whatever the order of the blocks.
  const uint64_t other_seed = gru_emu::env_u64("GRU_EMU_SEED", gru_emu::kDefaultSeed) + 1;
  const Results again = quick ? res : run(other_seed, Family::kStep);
  auto same = [](const std::vector<S>& a, const std::vector<S>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(S)) == 0;
  };
  auto all_same = [&](const Results& a, const Results& b) {
    return same(a.out, b.out) && same(a.ws, b.ws) && same(a.dG, b.dG) && same(a.dGh, b.dGh) &&
           same(a.grad_hx, b.grad_hx);
  };
  expect(all_same(res, again), "results depend on the block order", p, 0);
  // The persistent kernels (float64 stays on the step kernels): the same bits.
  if (sizeof(S) == 4 && (!quick || p.reverse == p.lengths)) {
    if (run_cluster) {
      expect(all_same(res, run(0, Family::kCluster)), "cluster kernels differ from step kernels",
             p, 0);
    }
    if (run_cooperative) {
      expect(all_same(res, run(0, Family::kCooperative)),
             "cooperative kernels differ from step kernels", p, 0);
    }
  }

  const double tol = sizeof(S) == 8 ? 1e-10 : 1e-4;
  std::vector<double> want;
  reference_loss(p, in, go, gh, &want);
  double err = 0;
  for (size_t e = 0; e < want.size(); ++e) err = std::fmax(err, std::fabs(out[e] - want[e]));
  expect(err <= tol, sizeof(S) == 8 ? "forward (double)" : "forward (float)", p, err);
  if (sizeof(S) != 8) return;

  // <gradient, direction> from the kernels' outputs, the weight gradients assembled
  // as the driver's post-loop GEMMs do.
  Inputs dir{randn(in.gi.size()), randn(in.hx.size()), randn(in.w.size()),
             randn(in.b_hn.size()), {}};
  if (!p.reset_after) std::fill(dir.b_hn.begin(), dir.b_hn.end(), 0.0);
  const std::vector<S>& dgh = p.reset_after ? dGh : dG;
  double analytic = 0;
  for (size_t e = 0; e < dG.size(); ++e) analytic += dG[e] * dir.gi[e];
  for (int e = 0; e < B * H; ++e) analytic += grad_hx[e] * dir.hx[e];
  for (int t = 0; t < T; ++t) {
    const int i = p.reverse ? T - 1 - t : t;  // loop index of step t
    const S* hprev = i == 0 ? hx.data() : out.data() + (p.reverse ? t + 1 : t - 1) * B * H;
    const S* rh = ws.data() + (int64_t)kSlotHn * T * B * H + t * B * H;
    for (int b = 0; b < B; ++b)
      for (int row = 0; row < G; ++row) {
        const double d = dgh[(t * B + b) * G + row];
        const S* x = (!p.reset_after && row >= 2 * H) ? rh : hprev;
        for (int k = 0; k < H; ++k) analytic += d * x[b * H + k] * dir.w[row * H + k];
        if (p.reset_after && row >= 2 * H) analytic += d * dir.b_hn[row - 2 * H];
      }
  }
  const double eps = 1e-6;
  auto shifted = [&](double s) {
    Inputs x = in;
    for (size_t e = 0; e < x.gi.size(); ++e) x.gi[e] += s * dir.gi[e];
    for (size_t e = 0; e < x.hx.size(); ++e) x.hx[e] += s * dir.hx[e];
    for (size_t e = 0; e < x.w.size(); ++e) x.w[e] += s * dir.w[e];
    for (size_t e = 0; e < x.b_hn.size(); ++e) x.b_hn[e] += s * dir.b_hn[e];
    return reference_loss(p, x, go, gh, nullptr);
  };
  const double numeric = (shifted(eps) - shifted(-eps)) / (2 * eps);
  const double rel = std::fabs(analytic - numeric) / std::fmax(1.0, std::fabs(numeric));
  expect(rel <= 1e-6, "backward vs finite differences", p, rel);
}

}  // namespace

int main(int argc, char** argv) {
  for (int a = 1; a < argc; ++a) {
    const std::string arg = argv[a];
    if (arg == "--quick") {
      quick = true;
    } else if (arg == "--family" && a + 1 < argc &&
               std::strstr(" cluster cooperative all none ", (" " + std::string(argv[a + 1]) + " ").c_str())) {
      const std::string f = argv[++a];
      run_cluster = f == "cluster" || f == "all";
      run_cooperative = f == "cooperative" || f == "all";
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--family cluster|cooperative|all|none]\n",
                   argv[0]);
      return 2;
    }
  }
  std::mt19937 rng(1234);
  std::normal_distribution<double> normal;
  int runs = 0;
  // Partial tiles everywhere (the tiles have 8 or 16 units and 4 or 8 rows, chunks of
  // 128 or 256 k): H = 37 several unit tiles; B = 9 and 5 partial row tiles; H = 67,
  // B = 9 several blocks in both grid dimensions, so blocks of one launch meet in a wave;
  // H = 300 several k chunks, the last partial, in every kernel (K = H, 2H or 3H).
  // Persistent kernels on the emulated 16 SMs: B = 9 two clusters (rows 5 + 4), H = 37
  // and 67 CTAs whose last unit slice is short, H = 3 a cluster of 2.
  const int shapes[][3] = {{3, 5, 37}, {2, 9, 8}, {1, 1, 3}, {2, 9, 67}, {2, 3, 300}};
  for (const auto& s : shapes)
    for (int variant = 0; variant < 8; ++variant) {
      Problem p{s[0], s[1], s[2], bool(variant & 1), bool(variant & 2), bool(variant & 4)};
      const int T = p.T, B = p.B, H = p.H;
      Inputs in;
      auto fill = [&](std::vector<double>& v, size_t n, double scale) {
        v.resize(n);
        for (auto& x : v) x = scale * normal(rng);
      };
      fill(in.gi, T * B * 3 * H, 1.0);
      fill(in.hx, B * H, 1.0);
      fill(in.w, 3 * H * H, 1.0 / std::sqrt(H));
      fill(in.b_hn, H, 1.0);
      in.len.resize(B);
      for (int b = 0; b < B; ++b) in.len[b] = (b * 7 + 1) % (T + 1);  // 0..T, mixed
      try {
        check<double>(p, in, rng);
        check<float>(p, in, rng);
      } catch (const std::exception& e) {  // the emulator's launch checks
        std::printf("launch failed: %s\n", e.what());
        std::printf("  in T=%d B=%d H=%d reset_after=%d reverse=%d lengths=%d\n", p.T, p.B,
                    p.H, p.reset_after, p.reverse, p.lengths);
        return 3;
      }
      runs += 2;
    }
  std::printf("sanitize_main: %d configurations checked, %d failures\n", runs, failures);
  return failures == 0 ? 0 : 1;
}
