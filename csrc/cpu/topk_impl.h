// Per-group top-k selection loops. Included twice by topk_cpu.cpp, inside namespace isa_default and
// (under `#pragma GCC target("avx2,fma")`) inside namespace isa_avx2; hence no include guard and no
// #include here: everything it needs is included by topk_cpu.cpp before.
//
// Selection works on order-preserving integer keys: key(y) compares like y, -0.0 equals +0.0 and every
// NaN is the largest key (as torch.sort orders them). The k-th largest key `thr` of a group is found
// without sorting; the selection is every key > thr plus the first (k - #keys > thr) keys == thr in
// index order, which is the stable descending order's first k (ties go to the lower index).

template <typename T>
struct KeyTraits;
template <>
struct KeyTraits<float> {
  using K = int32_t;
  using U = uint32_t;
  static constexpr int kBits = 32;
  static constexpr K kMax = INT32_MAX;
};
template <>
struct KeyTraits<double> {
  using K = int64_t;
  using U = uint64_t;
  static constexpr int kBits = 64;
  static constexpr K kMax = INT64_MAX;
};

// Order-preserving key of y: sign-magnitude bits to two's complement (an involution, see value_of).
template <typename T>
static inline typename KeyTraits<T>::K key_of(T y) {
  using K = typename KeyTraits<T>::K;
  const T yc = y + T(0);  // -0.0 -> +0.0
  K b;
  std::memcpy(&b, &yc, sizeof(b));
  const K k = b ^ ((b >> (KeyTraits<T>::kBits - 1)) & KeyTraits<T>::kMax);
  return (y != y) ? KeyTraits<T>::kMax : k;
}

// Inverse of key_of (exact except that -0.0 comes back as +0.0 and NaN payloads are not kept).
template <typename T>
static inline T value_of(typename KeyTraits<T>::K k) {
  using K = typename KeyTraits<T>::K;
  const K b = k ^ ((k >> (KeyTraits<T>::kBits - 1)) & KeyTraits<T>::kMax);
  T y;
  std::memcpy(&y, &b, sizeof(y));
  return y;
}

template <typename T, bool HasBias, bool Relu>
static inline T preact(T x, T b) {
  T y = HasBias ? x + b : x;
  if (Relu) y = (y < T(0)) ? T(0) : y;  // NaN passes through, as torch.relu
  return y;
}

template <typename T>
struct KeyVec;
template <>
struct KeyVec<float> {
  typedef float FV __attribute__((vector_size(32)));
  typedef int32_t KV __attribute__((vector_size(32)));
};
template <>
struct KeyVec<double> {
  typedef double FV __attribute__((vector_size(32)));
  typedef int64_t KV __attribute__((vector_size(32)));
};

// Keys of n contiguous elements, a vector at a time (the same arithmetic as key_of / preact).
template <typename T, bool HasBias, bool Relu>
static void keys_contig_t(const T* __restrict x, int64_t n, T b, typename KeyTraits<T>::K* __restrict keys) {
  using FV = typename KeyVec<T>::FV;
  using KV = typename KeyVec<T>::KV;
  constexpr int L = 32 / sizeof(T);
  constexpr int S = KeyTraits<T>::kBits - 1;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    FV y;
    std::memcpy(&y, x + i, sizeof(y));
    if (HasBias) y = y + b;
    if (Relu) y = (y < FV{}) ? FV{} : y;
    const FV yc = y + FV{};
    const KV bits = (KV)yc;  // GCC vector cast: the same bits, reinterpreted
    KV k = bits ^ ((bits >> S) & KeyTraits<T>::kMax);
    k = (y != y) ? (KV{} + KeyTraits<T>::kMax) : k;
    std::memcpy(keys + i, &k, sizeof(k));
  }
  for (; i < n; ++i) keys[i] = key_of<T>(preact<T, HasBias, Relu>(x[i], b));
}

// Keys of `nc` consecutive channels of `len` contiguous elements each (channel c uses bias[c0 + c]).
template <typename T>
void group_keys(const T* x, int64_t nc, int64_t len, const T* bias, int64_t c0, bool relu,
                typename KeyTraits<T>::K* keys) {
  for (int64_t c = 0; c < nc; ++c) {
    const T* xc = x + c * len;
    auto* kc = keys + c * len;
    if (bias != nullptr) {
      const T b = bias[c0 + c];
      if (relu) keys_contig_t<T, true, true>(xc, len, b, kc);
      else keys_contig_t<T, true, false>(xc, len, b, kc);
    } else {
      if (relu) keys_contig_t<T, false, true>(xc, len, T(0), kc);
      else keys_contig_t<T, false, false>(xc, len, T(0), kc);
    }
  }
}

// Channel mode: keys of positions [p0, p0 + P) of one sample xn [C, HW], transposed to keysT [P][C]
// so that each group (a position) is contiguous. Rows of x are read contiguously, 16 channels at a
// time, and written as 16-key runs. row: 16 * P keys of scratch.
template <typename T>
void tile_keys(const T* xn, int64_t C, int64_t HW, int64_t p0, int64_t P, const T* bias, bool relu,
               typename KeyTraits<T>::K* __restrict keysT, typename KeyTraits<T>::K* __restrict row) {
  constexpr int64_t CB = 16;
  for (int64_t c0 = 0; c0 < C; c0 += CB) {
    const int64_t nc = std::min(CB, C - c0);
    for (int64_t c = 0; c < nc; ++c) group_keys<T>(xn + (c0 + c) * HW + p0, 1, P, bias, c0 + c, relu, row + c * P);
    for (int64_t p = 0; p < P; ++p) {
      auto* dst = keysT + p * C + c0;
      for (int64_t c = 0; c < nc; ++c) dst[c] = row[c * P + p];
    }
  }
}

// Bit j of gt / eq: keys[j] > thr / keys[j] == thr, for the m <= 64 keys of a block.
template <typename K>
static inline void block_masks(const K* __restrict keys, int64_t m, K thr, uint64_t& gt, uint64_t& eq) {
  gt = 0;
  eq = 0;
#if defined(SPARSEGEN_ISA_AVX2)
  if (m == 64 && sizeof(K) == 4) {
    const __m256i tv = _mm256_set1_epi32(static_cast<int32_t>(thr));
    for (int j = 0; j < 64; j += 8) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j));
      gt |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(v, tv))))) << j;
      eq |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(v, tv))))) << j;
    }
    return;
  }
  if (m == 64 && sizeof(K) == 8) {
    const __m256i tv = _mm256_set1_epi64x(static_cast<int64_t>(thr));
    for (int j = 0; j < 64; j += 4) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j));
      gt |= uint64_t(uint32_t(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(v, tv))))) << j;
      eq |= uint64_t(uint32_t(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(v, tv))))) << j;
    }
    return;
  }
#elif defined(__SSE2__)
  if (m == 64 && sizeof(K) == 4) {
    const __m128i tv = _mm_set1_epi32(static_cast<int32_t>(thr));
    for (int j = 0; j < 64; j += 4) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + j));
      gt |= uint64_t(uint32_t(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(v, tv))))) << j;
      eq |= uint64_t(uint32_t(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(v, tv))))) << j;
    }
    return;
  }
#endif
  for (int64_t j = 0; j < m; ++j) {
    gt |= uint64_t(keys[j] > thr) << j;
    eq |= uint64_t(keys[j] == thr) << j;
  }
}

// Number of keys > t among 64 (AVX2, 32-bit keys: compare, movemask, popcount; the dependency chain
// of the bisection below is then a few cycles shorter than with a horizontal sum).
template <typename K>
static inline int64_t count_gt64(const K* __restrict keys, K t) {
#if defined(SPARSEGEN_ISA_AVX2)
  if (sizeof(K) == 4) {
    const __m256i tv = _mm256_set1_epi32(static_cast<int32_t>(t));
    uint64_t m = 0;
    for (int j = 0; j < 64; j += 8) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j));
      m |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(v, tv))))) << j;
    }
    return __builtin_popcountll(m);
  }
#endif
  int32_t c = 0;
  for (int j = 0; j < 64; ++j) c += keys[j] > t;
  return c;
}

template <typename K>
static inline int64_t count_ge(const K* __restrict keys, int64_t n, K t) {
  if (n == 64 && t != std::numeric_limits<K>::min()) return count_gt64<K>(keys, static_cast<K>(t - 1));
  // Blocks of 2^20 so that a 32-bit accumulator (which vectorises well) never overflows.
  int64_t total = 0;
  for (int64_t b = 0; b < n; b += (int64_t(1) << 20)) {
    const int64_t e = std::min(n, b + (int64_t(1) << 20));
    int32_t c = 0;
    for (int64_t i = b; i < e; ++i) c += keys[i] >= t;
    total += c;
  }
  return total;
}

template <typename K>
struct Threshold {
  K thr;          // select every key > thr ...
  int64_t above;  // ... (there are `above` of them) and the first k - above keys == thr
};

// Largest t (the k-th largest key) with #(key >= t) >= k, built bit by bit from `start_bit` down,
// above the fixed prefix t0 (every key of `keys` has that prefix or a larger one). Stops early when
// a candidate has exactly k keys at or above it.
template <typename T>
static Threshold<typename KeyTraits<T>::K> bisect_threshold(const typename KeyTraits<T>::K* keys, int64_t n,
                                                           int64_t k, typename KeyTraits<T>::U t0, int start_bit) {
  using K = typename KeyTraits<T>::K;
  using U = typename KeyTraits<T>::U;
  const U sign = U(1) << (KeyTraits<T>::kBits - 1);
  U t = t0;
  for (int bit = start_bit; bit >= 0; --bit) {
    const U cand = t | (U(1) << bit);
    const K cs = static_cast<K>(cand ^ sign);
    const int64_t c = count_ge<K>(keys, n, cs);
    if (c >= k) {
      t = cand;
      if (c == k) return {static_cast<K>(cs - 1), k};  // cand > 0, so cs - 1 does not overflow
    }
  }
  const K thr = static_cast<K>(t ^ sign);
  const int64_t above = thr == KeyTraits<T>::kMax ? 0 : count_ge<K>(keys, n, static_cast<K>(thr + 1));
  return {thr, above};
}

// Small k (1 <= k <= 64): keep the k largest keys seen so far, looking only at the keys of each block
// of 64 that beat the current k-th largest.
template <typename T>
static Threshold<typename KeyTraits<T>::K> running_threshold(const typename KeyTraits<T>::K* __restrict keys,
                                                            int64_t n, int64_t k) {
  using K = typename KeyTraits<T>::K;
  K best[64] = {};
  for (int64_t i = 0; i < k; ++i) best[i] = keys[i];
  int64_t mi = 0;
  for (int64_t i = 1; i < k; ++i)
    if (best[i] < best[mi]) mi = i;
  K mn = best[mi];
  auto offer = [&](K key) {
    if (key > mn) {
      best[mi] = key;
      mi = 0;
      for (int64_t j = 1; j < k; ++j)
        if (best[j] < best[mi]) mi = j;
      mn = best[mi];
    }
  };
  for (int64_t b0 = k; b0 < n; b0 += 64) {
    uint64_t gt, eq;
    block_masks<K>(keys + b0, std::min<int64_t>(64, n - b0), mn, gt, eq);
    for (; gt != 0; gt &= gt - 1) offer(keys[b0 + __builtin_ctzll(gt)]);
  }
  int64_t above = 0;
  for (int64_t j = 0; j < k; ++j) above += best[j] > mn;
  return {mn, above};
}

// Very large groups: one pass of an 11-bit histogram on the top bits narrows the k-th key to one
// bin; bisection then runs on that bin's keys only (copied to `scratch`, at least n long).
template <typename T>
static Threshold<typename KeyTraits<T>::K> radix_threshold(const typename KeyTraits<T>::K* __restrict keys,
                                                          int64_t n, int64_t k,
                                                          typename KeyTraits<T>::K* __restrict scratch) {
  using K = typename KeyTraits<T>::K;
  using U = typename KeyTraits<T>::U;
  constexpr int kBins = 2048;
  constexpr int shift = KeyTraits<T>::kBits - 11;
  const U sign = U(1) << (KeyTraits<T>::kBits - 1);
  int32_t hist[kBins];
  std::memset(hist, 0, sizeof(hist));
  for (int64_t i = 0; i < n; ++i) hist[(static_cast<U>(keys[i]) ^ sign) >> shift]++;
  int64_t cum = 0;
  int b = kBins - 1;
  for (; b > 0; --b) {
    if (cum + hist[b] >= k) break;
    cum += hist[b];
  }
  const U lo = static_cast<U>(b) << shift;
  if (b > 0 && cum + hist[b] == k) return {static_cast<K>((lo ^ sign) - 1), k};
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const K key = keys[i];
    scratch[m] = key;
    m += ((static_cast<U>(key) ^ sign) >> shift) == static_cast<U>(b);
  }
  Threshold<K> t = bisect_threshold<T>(scratch, m, k - cum, lo, shift - 1);
  t.above += cum;
  return t;
}

// Selects the top k of the n keys; writes their values and indices, ascending, to vals/idx
// (each at least k + 1 long). scratch: n keys of work space.
template <typename T>
void select_topk(const typename KeyTraits<T>::K* __restrict keys, int64_t n, int64_t k,
                 typename KeyTraits<T>::K* __restrict scratch, T* __restrict vals, int32_t* __restrict idx) {
  using K = typename KeyTraits<T>::K;
  if (k == n) {
    for (int64_t i = 0; i < n; ++i) {
      vals[i] = value_of<T>(keys[i]);
      idx[i] = static_cast<int32_t>(i);
    }
    return;
  }
  Threshold<K> th;
  if (k <= 32 && n >= 16 * k) th = running_threshold<T>(keys, n, k);
  else if (n > 4096) th = radix_threshold<T>(keys, n, k, scratch);
  else th = bisect_threshold<T>(keys, n, k, 0, KeyTraits<T>::kBits - 1);
  int64_t need = k - th.above;  // how many keys equal to thr still to take (lowest indices first)
  int64_t pos = 0;
  for (int64_t b0 = 0; b0 < n && pos < k; b0 += 64) {
    uint64_t gt, eq;
    block_masks<K>(keys + b0, std::min<int64_t>(64, n - b0), th.thr, gt, eq);
    uint64_t take = gt;
    for (; need > 0 && eq != 0; --need, eq &= eq - 1) take |= eq & (~eq + 1);
    for (; take != 0; take &= take - 1) {
      const int64_t j = b0 + __builtin_ctzll(take);
      vals[pos] = value_of<T>(keys[j]);
      idx[pos] = static_cast<int32_t>(j);
      ++pos;
    }
  }
}
