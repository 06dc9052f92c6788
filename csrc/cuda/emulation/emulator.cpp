// The emulator's runtime (see emulator.h): fibers, barriers, warp collectives, cp.async
// groups, and the fp16/bf16 conversions. Fragment layouts are the PTX ISA's (ptx.cuh header).
#include "cuda/emulation/emulator.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace emu {
namespace {

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "emulator: %s (block %u, thread %u)\n", what, blockIdx.x, threadIdx.x);
  std::abort();
}

constexpr size_t kStackBytes = 256 * 1024;

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  uint3 thread{};
  bool done = false;
  std::vector<Copy> copies;        // cp.async issued, not yet performed
  std::vector<size_t> group_ends;  // committed groups: end index into copies
};

enum Op : int { kShfl = 1, kLdmatrix, kLdmatrixTrans, kMma, kMmaBf16, kSyncwarp };

struct Payload {
  uint32_t u[10];
  float f[4];
  const void* p;
};

struct Warp {
  int arrived = 0;
  uint64_t generation = 0;
  int op = 0;
  Payload in[32];
  Payload out[32];
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  std::vector<char> shared;
  std::vector<Warp> warps;
  int barrier_arrived = 0;
  uint64_t barrier_generation = 0;
  int barrier_or = 0;
  int barrier_result = 0;
  uint64_t progress = 0;
  const std::function<void()>* body = nullptr;
};

Block* g_block = nullptr;
uint64_t g_launched = 0;

Fiber& self() { return g_block->fibers[g_block->current]; }

void yield() { swapcontext(&self().context, &g_block->scheduler); }

void fiber_main() {
  (*g_block->body)();
  Fiber& f = self();
  if (f.copies.size() != 0) fail("thread exited with cp.async copies still in flight (missing wait)");
  f.done = true;
  ++g_block->progress;
}

bool in_shared(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  return c >= g_block->shared.data() && c + bytes <= g_block->shared.data() + g_block->shared.size();
}

void perform(const Copy& c) {
  if (c.bytes > 0) std::memcpy(c.dst, c.src, c.bytes);
  std::memset(static_cast<char*>(c.dst) + c.bytes, 0, 16 - c.bytes);
}

// Deposits this lane's payload; the last lane of the warp computes everyone's result.
template <typename Compute>
Payload collective(int op, const Payload& in, Compute compute) {
  const int tid = static_cast<int>(threadIdx.x);
  Warp& w = g_block->warps[tid / 32];
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    fail("lanes of a warp reached different warp-wide instructions (divergence)");
  }
  w.in[tid % 32] = in;
  const uint64_t generation = w.generation;
  ++w.arrived;
  ++g_block->progress;
  if (w.arrived == 32) {
    compute(w.in, w.out);
    w.arrived = 0;
    ++w.generation;
  } else {
    while (w.generation == generation) yield();
  }
  return w.out[tid % 32];
}

uint16_t load_u16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

float element_to_float(uint16_t bits, bool bf16) { return bf16 ? bf16_to_float(bits) : half_to_float(bits); }

}  // namespace

Options& options() {
  static Options o;
  return o;
}

uint64_t launched_blocks() { return g_launched; }

void launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  const unsigned threads = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1 || threads % 32 != 0) fail("blocks must be 1-D and a multiple of 32 threads");
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        Block b;
        b.body = &body;
        b.shared.assign(shared_bytes + 16, static_cast<char>(0xFF));  // NaN in fp16, bf16 and fp32
        b.warps.resize(threads / 32);
        b.fibers.resize(threads);
        g_block = &b;
        for (unsigned t = 0; t < threads; ++t) {
          Fiber& f = b.fibers[t];
          f.thread = uint3{t, 0, 0};
          f.stack.reset(new char[kStackBytes]);
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.get();
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = &b.scheduler;
          makecontext(&f.context, fiber_main, 0);
        }
        // One pass runs every live fiber of `warps` once; returns whether any was live.
        const auto pass = [&](unsigned first_warp, unsigned warp_count) {
          bool live = false;
          for (unsigned i = 0; i < warp_count * 32; ++i) {
            const unsigned t = first_warp * 32 + (options().reverse_schedule ? warp_count * 32 - 1 - i : i);
            if (b.fibers[t].done) continue;
            live = true;
            b.current = static_cast<int>(t);
            threadIdx = b.fibers[t].thread;
            swapcontext(&b.scheduler, &b.fibers[t].context);
          }
          return live;
        };
        const unsigned warps = threads / 32;
        for (;;) {
          const uint64_t before = b.progress;
          bool live = false;
          if (options().greedy_warps) {
            for (unsigned i = 0; i < warps; ++i) {
              const unsigned w = options().reverse_schedule ? warps - 1 - i : i;
              for (;;) {  // this warp alone until it is blocked at a block barrier or done
                const uint64_t warp_before = b.progress;
                const bool warp_live = pass(w, 1);
                live |= warp_live;
                if (!warp_live || b.progress == warp_before) break;
              }
            }
          } else {
            live = pass(0, warps);
          }
          if (!live) break;
          if (b.progress == before) fail("deadlock: no thread can make progress (a barrier some threads skip?)");
        }
        g_block = nullptr;
        ++g_launched;
      }
    }
  }
}

char* shared_memory() {
  // 128-byte aligned base inside the block's buffer.
  char* base = g_block->shared.data();
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) fail("shared memory base not 16-byte aligned");
  return base;
}

void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  if (!in_shared(smem, 16)) fail("cp.async destination outside shared memory");
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0) fail("cp.async destination not 16-byte aligned");
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async src-size outside 0..16");
  if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0) fail("cp.async source not 16-byte aligned");
  const Copy c{smem, gmem, src_bytes};
  if (options().late_cp_async) {
    self().copies.push_back(c);
  } else {
    perform(c);
  }
}

void cp_async_commit() {
  Fiber& f = self();
  f.group_ends.push_back(f.copies.size());
}

void cp_async_wait(int pending) {
  Fiber& f = self();
  const size_t groups = f.group_ends.size();
  if (groups <= static_cast<size_t>(pending)) return;
  const size_t done_groups = groups - pending;
  const size_t done_copies = f.group_ends[done_groups - 1];
  for (size_t i = 0; i < done_copies; ++i) perform(f.copies[i]);
  f.copies.erase(f.copies.begin(), f.copies.begin() + done_copies);
  f.group_ends.erase(f.group_ends.begin(), f.group_ends.begin() + done_groups);
  for (size_t& end : f.group_ends) end -= done_copies;
}

void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans) {
  if (!in_shared(smem, 16)) fail("ldmatrix row address outside shared memory");
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  Payload in{};
  in.p = smem;
  const Payload out = collective(trans ? kLdmatrixTrans : kLdmatrix, in, [trans](const Payload* lanes, Payload* res) {
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      for (int m = 0; m < 4; ++m) {
        // Row addresses of matrix m come from lanes 8m..8m+7.
        uint16_t lo, hi;
        if (!trans) {  // (row g, cols 2t, 2t+1)
          const char* row = static_cast<const char*>(lanes[8 * m + g].p);
          lo = load_u16(row + 4 * t);
          hi = load_u16(row + 4 * t + 2);
        } else {  // (rows 2t, 2t+1, col g)
          lo = load_u16(static_cast<const char*>(lanes[8 * m + 2 * t].p) + 2 * g);
          hi = load_u16(static_cast<const char*>(lanes[8 * m + 2 * t + 1].p) + 2 * g);
        }
        res[lane].u[m] = lo | (static_cast<uint32_t>(hi) << 16);
      }
    }
  });
  for (int m = 0; m < 4; ++m) r[m] = out.u[m];
}

void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Payload in{};
  for (int i = 0; i < 4; ++i) in.u[i] = a[i];
  in.u[4] = b0;
  in.u[5] = b1;
  for (int i = 0; i < 4; ++i) in.f[i] = d[i];
  const Payload out = collective(bf16 ? kMmaBf16 : kMma, in, [bf16](const Payload* lanes, Payload* res) {
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      const Payload& L = lanes[lane];
      for (int c = 0; c < 2; ++c) {
        const auto half = [&](uint32_t reg) { return element_to_float(static_cast<uint16_t>(reg >> (16 * c)), bf16); };
        A[g][2 * t + c] = half(L.u[0]);
        A[g + 8][2 * t + c] = half(L.u[1]);
        A[g][2 * t + 8 + c] = half(L.u[2]);
        A[g + 8][2 * t + 8 + c] = half(L.u[3]);
        B[2 * t + c][g] = half(L.u[4]);
        B[2 * t + 8 + c][g] = half(L.u[5]);
        C[g][2 * t + c] = L.f[c];
        C[g + 8][2 * t + c] = L.f[2 + c];
      }
    }
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
        float acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        res[lane].f[e] = acc;
      }
    }
  });
  for (int e = 0; e < 4; ++e) d[e] = out.f[e];
}

void copy_16(void* dst, const void* src) { std::memcpy(dst, src, 16); }

// ---- fp16 / bf16 <-> fp32, round to nearest even ---------------------------------------------

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1F;
  const uint32_t mantissa = h & 0x3FF;
  uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: value = mantissa · 2^-24
    const float value = std::ldexp(static_cast<float>(mantissa), -24);
    std::memcpy(&bits, &value, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const float magnitude = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7E00u;
  if (magnitude >= 65520.0f) return sign | 0x7C00u;  // rounds to infinity
  if (magnitude < std::ldexp(1.0f, -14)) {           // subnormal or zero: multiples of 2^-24
    const float scaled = std::nearbyint(magnitude * 16777216.0f);  // round-half-even (default mode)
    return sign | static_cast<uint16_t>(scaled);
  }
  uint32_t m;
  std::memcpy(&m, &magnitude, 4);
  const uint32_t exponent = (m >> 23) - 112;
  uint32_t mantissa = m & 0x7FFFFFu;
  uint32_t result = (exponent << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (result & 1u))) ++result;  // carries into the exponent correctly
  return sign | static_cast<uint16_t>(result);
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace emu

// ---- Block barriers and shuffles --------------------------------------------------------------

int __syncthreads_or(int predicate) {
  using namespace emu;
  Block& b = *g_block;
  const uint64_t generation = b.barrier_generation;
  b.barrier_or |= predicate != 0;
  ++b.barrier_arrived;
  ++b.progress;
  if (b.barrier_arrived == static_cast<int>(b.fibers.size())) {
    b.barrier_result = b.barrier_or;
    b.barrier_or = 0;
    b.barrier_arrived = 0;
    ++b.barrier_generation;
  } else {
    while (b.barrier_generation == generation) yield();
  }
  return b.barrier_result;
}

void __syncthreads() { __syncthreads_or(0); }

void __syncwarp(unsigned mask) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask is not emulated");
  emu::collective(emu::kSyncwarp, emu::Payload{}, [](const emu::Payload*, emu::Payload*) {});
}

float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  if (mask != 0xffffffffu) emu::fail("shuffles with a partial mask are not emulated");
  emu::Payload in{};
  in.f[0] = value;
  in.u[0] = static_cast<uint32_t>(lane_mask);
  return emu::collective(emu::kShfl, in, [](const emu::Payload* lanes, emu::Payload* res) {
           for (int lane = 0; lane < 32; ++lane) res[lane].f[0] = lanes[lane ^ lanes[lane].u[0]].f[0];
         }).f[0];
}

float __shfl_sync(unsigned mask, float value, int src_lane) {
  if (mask != 0xffffffffu) emu::fail("shuffles with a partial mask are not emulated");
  emu::Payload in{};
  in.f[0] = value;
  in.u[0] = static_cast<uint32_t>(src_lane);
  return emu::collective(emu::kShfl + 100, in, [](const emu::Payload* lanes, emu::Payload* res) {
           for (int lane = 0; lane < 32; ++lane) res[lane].f[0] = lanes[lanes[lane].u[0] % 32].f[0];
         }).f[0];
}
