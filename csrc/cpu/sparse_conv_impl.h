// Inner loops of the sparse transposed convolution (forward, input gradient, weight gradient).
// Included three times by sparse_conv_cpu.cpp (see isa_copies.h): inside namespace isa_default, isa_avx2
// (`#pragma GCC target("avx2,fma")`) and isa_avx512; hence no include guard and no #include. A vector is
// 32 bytes, 64 in the AVX-512 copy, so the chunk widths differ per copy: the caller takes them from
// the copy it runs (VecT<T>::L). Uses ConvGeom from sparse_conv_cpu.cpp.
//
// Layouts (T = kh * kw taps, tap t = i * kw + j; VW = one chunk of output channels: one vector in the
// forward, two in the gradients):
//   weight  W[c, t, chunk] at Wt + chunk * w_chunk + c * w_cin + woff[t], VW contiguous values: either
//           the caller's weight read in place (Cout contiguous) or a copy packed [nchunks][Cin][T][VW]
//   output  buf  [chunk][Hp][Wp][VW]         Hp = Ho + 2 ph, Wp = Wo + 2 pw: padded so that every
//   grad    gpad [nchunks][N][Hp][Wp][VW]    tap lands inside and borders need no tests.
// Input (ih, iw) with tap (i, j) reaches padded output pixel (ih * sh + i, iw * sw + j).
// Every loop keeps its accumulators in registers: a block of taps x one chunk of output channels.

#ifdef SPARSEGEN_ISA_AVX512
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif

template <typename T>
struct VecT {
  typedef T V __attribute__((vector_size(kVectorBytes)));
  static constexpr int L = kVectorBytes / static_cast<int>(sizeof(T));
};

template <typename T>
static inline typename VecT<T>::V vload(const T* p) {
  typename VecT<T>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
static inline void vstore(T* p, const typename VecT<T>::V& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
static inline T hsum(const typename VecT<T>::V& v) {
  T s = T(0);
  for (int l = 0; l < VecT<T>::L; ++l) s += v[l];
  return s;
}

constexpr int kMaxTapBlock = 6;  // 6 taps x 2 vectors = 12 accumulators (+ operands) in 16 registers

// Forward: the entries (channel ch[e], value val[e]) of one input position, TB taps, one chunk of
// one vector of output channels: acc[t] = sum_e val[e] * W[ch[e], t, chunk]; then buf[pixel(t)] +=
// acc[t]. Packed: the taps of a channel are consecutive chunks (woff[t] = t * L, known at compile time).
// (One vector per tap and up to 16 taps per pass measured faster than two vectors x 6 taps: the whole
// 4x4 folded kernel takes one pass over the entries.)
template <typename T, int TB, bool Packed>
static inline void fwd_micro(const int32_t* __restrict ch, const T* __restrict val, int64_t ne,
                             const T* __restrict Wc, int64_t cstride, const int64_t* __restrict woff,
                             T* __restrict bp, const int64_t* __restrict boff) {
  using V = typename VecT<T>::V;
  constexpr int L = VecT<T>::L;
  V a[TB];
#pragma GCC unroll 16
  for (int t = 0; t < TB; ++t) a[t] = V{};
  if (Packed) {
    const T* W0 = Wc + woff[0];
    for (int64_t e = 0; e < ne; ++e) {
      const T v = val[e];
      const T* w = W0 + static_cast<int64_t>(ch[e]) * cstride;
#pragma GCC unroll 16
      for (int t = 0; t < TB; ++t) a[t] += v * vload<T>(w + t * L);
    }
  } else {
    int64_t wo[TB];
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) wo[t] = woff[t];
    for (int64_t e = 0; e < ne; ++e) {
      const T v = val[e];
      const T* w = Wc + static_cast<int64_t>(ch[e]) * cstride;
#pragma GCC unroll 16
      for (int t = 0; t < TB; ++t) a[t] += v * vload<T>(w + wo[t]);
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < TB; ++t) {
    T* o = bp + boff[t];
    vstore<T>(o, vload<T>(o) + a[t]);
  }
}

template <typename T, bool Packed>
static inline void fwd_taps(const int32_t* ch, const T* val, int64_t ne, const T* Wc, int64_t cstride,
                            const int64_t* woff, T* bp, const int64_t* boff, int64_t ntaps) {
  for (int64_t t0 = 0; t0 < ntaps;) {
    const int64_t left = ntaps - t0;
    // One pass over the entries per block of taps: a 3x3 kernel (9 taps) takes one pass of 9, not 8 + 1 (a
    // lone tap has one accumulator, a chain of dependent FMAs as long as the entry list).
    if (left >= 16) {
      fwd_micro<T, 16, Packed>(ch, val, ne, Wc, cstride, woff + t0, bp, boff + t0);
      t0 += 16;
    } else if (left >= 12) {
      fwd_micro<T, 12, Packed>(ch, val, ne, Wc, cstride, woff + t0, bp, boff + t0);
      t0 += 12;
    } else if (left >= 9) {
      fwd_micro<T, 9, Packed>(ch, val, ne, Wc, cstride, woff + t0, bp, boff + t0);
      t0 += 9;
    } else if (left >= 8) {
      fwd_micro<T, 8, Packed>(ch, val, ne, Wc, cstride, woff + t0, bp, boff + t0);
      t0 += 8;
    } else if (left >= 4) {
      fwd_micro<T, 4, Packed>(ch, val, ne, Wc, cstride, woff + t0, bp, boff + t0);
      t0 += 4;
    } else if (left >= 2) {
      fwd_micro<T, 2, Packed>(ch, val, ne, Wc, cstride, woff + t0, bp, boff + t0);
      t0 += 2;
    } else {
      fwd_micro<T, 1, Packed>(ch, val, ne, Wc, cstride, woff + t0, bp, boff + t0);
      t0 += 1;
    }
  }
}

// One forward task: sample n, output-channel chunks [c0, c1) of one vector each. ptr/ch/val: entries grouped by input
// position (ptr [N*H*W + 1]). Writes out[n, c0*VW : c1*VW, :, :] (+ bias). buf: (c1-c0)*Hp*Wp*VW.
// Chunks innermost when the weight is streamed (few entries per input channel: each weight row is read
// once, contiguously), outermost otherwise (the chunk's weight columns stay in cache).
template <typename T>
void fwd_task(const ConvGeom& g, const int64_t* ptr, const int32_t* ch, const T* val, const T* Wt, const T* bias,
              const int64_t* woff, const int64_t* boff, int64_t n, int64_t c0, int64_t c1, bool chunk_inner, T* buf,
              T* out) {
  constexpr int VW = VecT<T>::L;  // the forward's chunk: one vector
  const int64_t plane = g.Hp * g.Wp * VW;
  std::memset(buf, 0, sizeof(T) * plane * (c1 - c0));
  const int64_t HW = g.H * g.W;
  auto position = [&](int64_t p, int64_t chunk, int64_t b, int64_t e) {
    if (b == e) return;
    const int64_t ih = p / g.W, iw = p % g.W;
    T* bp = buf + (chunk - c0) * plane + ((ih * g.sh) * g.Wp + iw * g.sw) * VW;
    const T* Wc = Wt + chunk * g.w_chunk;
    if (g.w_packed) fwd_taps<T, true>(ch + b, val + b, e - b, Wc, g.w_cin, woff, bp, boff, g.T);
    else fwd_taps<T, false>(ch + b, val + b, e - b, Wc, g.w_cin, woff, bp, boff, g.T);
  };
  const int64_t* pn = ptr + n * HW;
  if (chunk_inner) {
    for (int64_t p = 0; p < HW; ++p)
      for (int64_t chunk = c0; chunk < c1; ++chunk) position(p, chunk, pn[p], pn[p + 1]);
  } else {
    // Input channels in blocks of g.cin_block (one block's weight columns of a chunk fit in L2); the
    // entries of a position are sorted by channel, so each block's are a contiguous run.
    std::vector<int64_t> cur(static_cast<size_t>(HW));
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      std::copy(pn, pn + HW, cur.begin());
      for (int64_t cb = 0; cb < g.Cin; cb += g.cin_block) {
        const int64_t cend = cb + g.cin_block;
        for (int64_t p = 0; p < HW; ++p) {
          const int64_t b = cur[p];
          int64_t e = b;
          while (e < pn[p + 1] && ch[e] < cend) ++e;
          position(p, chunk, b, e);
          cur[p] = e;
        }
      }
    }
  }
  const int64_t HoWo = g.Ho * g.Wo;
  for (int64_t chunk = c0; chunk < c1; ++chunk) {
    const int64_t nco = std::min<int64_t>(VW, g.Cout - chunk * VW);
    const T* pb = buf + (chunk - c0) * plane;
    for (int64_t jj = 0; jj < nco; ++jj) {
      const int64_t co = chunk * VW + jj;
      const T bv = bias != nullptr ? bias[co] : T(0);
      T* o = out + (n * g.Cout + co) * HoWo;
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        const T* br = pb + ((oh + g.ph) * g.Wp + g.pw) * VW + jj;
        T* orow = o + oh * g.Wo;
        if (bias != nullptr)
          for (int64_t ow = 0; ow < g.Wo; ++ow) orow[ow] = br[ow * VW] + bv;
        else
          for (int64_t ow = 0; ow < g.Wo; ++ow) orow[ow] = br[ow * VW];
      }
    }
  }
}

// Input gradient of E entries at one input position, one chunk: for each entry e,
// sum over taps t and the chunk's channels of gpad[pixel(t), chunk] * W[ch[e], t, chunk].
template <typename T, int E, bool Packed>
static inline void igrad_micro(const int32_t* __restrict ch, const int64_t* __restrict slot, const T* __restrict gp,
                               const int64_t* __restrict goff, int64_t ntaps, const int64_t* __restrict woff,
                               const T* __restrict Wc, int64_t cstride, T* __restrict gv) {
  using V = typename VecT<T>::V;
  constexpr int L = VecT<T>::L;
  V a0[E], a1[E];
  const T* w[E];
#pragma GCC unroll 4
  for (int x = 0; x < E; ++x) {
    a0[x] = V{};
    a1[x] = V{};
    w[x] = Wc + static_cast<int64_t>(ch[x]) * cstride;
  }
  for (int64_t t = 0; t < ntaps; ++t) {
    const T* gt = gp + goff[t];
    const V g0 = vload<T>(gt), g1 = vload<T>(gt + L);
    const int64_t wt = Packed ? t * 2 * L : woff[t];
#pragma GCC unroll 4
    for (int x = 0; x < E; ++x) {
      a0[x] += g0 * vload<T>(w[x] + wt);
      a1[x] += g1 * vload<T>(w[x] + wt + L);
    }
  }
#pragma GCC unroll 4
  for (int x = 0; x < E; ++x) gv[slot[x]] += hsum<T>(a0[x] + a1[x]);
}

template <typename T, bool Packed>
static inline void igrad_entries(const int32_t* ch, const int64_t* slot, int64_t ne, const T* gp, const int64_t* goff,
                                 int64_t ntaps, const int64_t* woff, const T* Wc, int64_t cstride, T* gv) {
  int64_t x = 0;
  for (; x + 4 <= ne; x += 4) igrad_micro<T, 4, Packed>(ch + x, slot + x, gp, goff, ntaps, woff, Wc, cstride, gv);
  switch (ne - x) {
    case 3: igrad_micro<T, 3, Packed>(ch + x, slot + x, gp, goff, ntaps, woff, Wc, cstride, gv); break;
    case 2: igrad_micro<T, 2, Packed>(ch + x, slot + x, gp, goff, ntaps, woff, Wc, cstride, gv); break;
    case 1: igrad_micro<T, 1, Packed>(ch + x, slot + x, gp, goff, ntaps, woff, Wc, cstride, gv); break;
    default: break;
  }
}

// One input-gradient task: sample n, input positions [p_begin, p_end), all chunks (outermost, so the
// chunk's weight columns stay in cache, or innermost when the weight is streamed; see fwd_task).
// gv [N*G*k] receives the gradient at each slot.
template <typename T>
void igrad_task(const ConvGeom& g, const int64_t* ptr, const int32_t* ch, const int64_t* slot, const T* Wt,
                const int64_t* woff, const T* gpad, const int64_t* goff, int64_t n, int64_t p_begin, int64_t p_end,
                bool chunk_inner, T* gv) {
  constexpr int VW = 2 * VecT<T>::L;
  const int64_t HW = g.H * g.W;
  const int64_t gchunk = g.N * g.Hp * g.Wp * VW;  // gpad is [nchunks][N][Hp][Wp][VW]
  auto position = [&](int64_t p, int64_t chunk, int64_t b, int64_t e) {
    if (b == e) return;
    const int64_t ih = p / g.W, iw = p % g.W;
    const T* gp = gpad + chunk * gchunk + ((n * g.Hp + ih * g.sh) * g.Wp + iw * g.sw) * VW;
    const T* Wc = Wt + chunk * g.w_chunk;
    if (g.w_packed) igrad_entries<T, true>(ch + b, slot + b, e - b, gp, goff, g.T, woff, Wc, g.w_cin, gv);
    else igrad_entries<T, false>(ch + b, slot + b, e - b, gp, goff, g.T, woff, Wc, g.w_cin, gv);
  };
  const int64_t* pn = ptr + n * HW;
  if (chunk_inner) {
    for (int64_t p = p_begin; p < p_end; ++p)
      for (int64_t chunk = 0; chunk < g.nchunks; ++chunk) position(p, chunk, pn[p], pn[p + 1]);
  } else {  // input channels in blocks, as in fwd_task
    std::vector<int64_t> cur(static_cast<size_t>(p_end - p_begin));
    for (int64_t chunk = 0; chunk < g.nchunks; ++chunk) {
      std::copy(pn + p_begin, pn + p_end, cur.begin());
      for (int64_t cb = 0; cb < g.Cin; cb += g.cin_block) {
        const int64_t cend = cb + g.cin_block;
        for (int64_t p = p_begin; p < p_end; ++p) {
          const int64_t b = cur[p - p_begin];
          int64_t e = b;
          while (e < pn[p + 1] && ch[e] < cend) ++e;
          position(p, chunk, b, e);
          cur[p - p_begin] = e;
        }
      }
    }
  }
}

// Weight gradient of one input channel, TB taps, one chunk: acc[t] = sum_e val[e] * gpad[pos[e] + goff[t]].
template <typename T, int TB>
static inline void wgrad_micro(const int64_t* __restrict pos, const T* __restrict val, int64_t ne,
                               const T* __restrict gbase, const int64_t* __restrict goff, T* __restrict tmp) {
  using V = typename VecT<T>::V;
  constexpr int L = VecT<T>::L;
  V a0[TB], a1[TB];
  int64_t go[TB];
#pragma GCC unroll 8
  for (int t = 0; t < TB; ++t) {
    a0[t] = V{};
    a1[t] = V{};
    go[t] = goff[t];
  }
  for (int64_t e = 0; e < ne; ++e) {
    const T v = val[e];
    const T* gp = gbase + pos[e];
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
      a0[t] += v * vload<T>(gp + go[t]);
      a1[t] += v * vload<T>(gp + go[t] + L);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < TB; ++t) {
    vstore<T>(tmp + t * 2 * L, a0[t]);
    vstore<T>(tmp + t * 2 * L + L, a1[t]);
  }
}

// One weight-gradient task: input channels [c_begin, c_end), all chunks. cptr [Cin + 1] / pos / val:
// entries grouped by input channel (pos = offset of the entry's window in gpad). Writes
// dW [Cin][Cout][T] (contiguous [Cin, Cout, kh, kw]) for those channels (zero rows where a channel has
// no entries).
template <typename T>
void wgrad_task(const ConvGeom& g, const int64_t* cptr, const int64_t* pos, const T* val, const T* gpad,
                const int64_t* goff, int64_t c_begin, int64_t c_end, T* dW) {
  constexpr int VW = 2 * VecT<T>::L;
  T tmp[kMaxTapBlock * VW];
  for (int64_t c = c_begin; c < c_end; ++c)
    if (cptr[c] == cptr[c + 1]) std::memset(dW + c * g.Cout * g.T, 0, sizeof(T) * g.Cout * g.T);
  const int64_t gchunk = g.N * g.Hp * g.Wp * VW;  // gpad is [nchunks][N][Hp][Wp][VW]
  for (int64_t chunk = 0; chunk < g.nchunks; ++chunk) {
    const T* gb = gpad + chunk * gchunk;
    const int64_t nco = std::min<int64_t>(VW, g.Cout - chunk * VW);
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t b = cptr[c], e = cptr[c + 1];
      if (b == e) continue;
      for (int64_t t0 = 0; t0 < g.T; t0 += kMaxTapBlock) {
        const int64_t nt = std::min<int64_t>(kMaxTapBlock, g.T - t0);
        switch (nt) {
          case 6: wgrad_micro<T, 6>(pos + b, val + b, e - b, gb, goff + t0, tmp); break;
          case 5: wgrad_micro<T, 5>(pos + b, val + b, e - b, gb, goff + t0, tmp); break;
          case 4: wgrad_micro<T, 4>(pos + b, val + b, e - b, gb, goff + t0, tmp); break;
          case 3: wgrad_micro<T, 3>(pos + b, val + b, e - b, gb, goff + t0, tmp); break;
          case 2: wgrad_micro<T, 2>(pos + b, val + b, e - b, gb, goff + t0, tmp); break;
          default: wgrad_micro<T, 1>(pos + b, val + b, e - b, gb, goff + t0, tmp); break;
        }
        for (int64_t tt = 0; tt < nt; ++tt)
          for (int64_t jj = 0; jj < nco; ++jj) dW[(c * g.Cout + chunk * VW + jj) * g.T + t0 + tt] = tmp[tt * VW + jj];
      }
    }
  }
}
