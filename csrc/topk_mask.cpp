// Exact top-K over a list of float32 score tensors by radix select, batched over tasks, written
// as the packed mask of fsmtl_kernels/mask.py (per-parameter word-aligned int32 words, bit j % 32
// of word j / 32, little-endian). The mask holds exactly k ones: every key above the k-th largest
// key, then keys equal to it in position order (parameter order, then flat index).
//
// Scores become order-preserving uint32 keys on the fly (-0.0 canonicalized to +0.0; never stored).
//
// Fast path (P >= 2^18): a sample of 64K keys brackets the k-th largest key in [lo, hi]; one fused,
// vectorized pass writes the mask words of "key > hi" and copies the keys in [lo, hi] with their
// locations, in position order (a few percent of P); radix select over those candidates (11/11/10
// bit digits, per-chunk histograms) gives the exact threshold and the number of ties to take, and
// their bits are set. One read of the scores and one write of the mask.
//
// Full radix select (small P, or when the bracket misses or holds too many keys, e.g. heavy ties):
// digits of 11, 11 and 10 bits, most significant first; each pass builds per-thread histograms of
// the current digit over the keys that share the digits found so far, and stops as soon as the
// bucket holding the k-th largest key is taken whole (early exit). When that bucket is small after
// the first pass, its keys and positions are copied out during the second pass so the remaining
// passes touch only them; otherwise ties are located by per-block tie counts, prefix-summed.
// Bytes moved: 2 to 4 reads of the scores (4 * P each) plus the mask (P / 8) written once.
#include <torch/library.h>

#include "common.h"

#include <cmath>
#include <limits>

namespace fsmtl {
namespace {

constexpr int64_t kTopkBlock = 8192;             // entries per block: 256 mask words
constexpr int64_t kMinChunk = 1 << 16;           // below this many entries per thread, fewer threads
constexpr int kDigitBits[3] = {11, 11, 10};      // most significant first
constexpr int kDigitShift[3] = {21, 10, 0};
constexpr int kBuckets = 1 << 11;
// Interleaved sub-histograms hide store-to-load stalls on runs of equal digits.
constexpr int kSubHists = 4;
constexpr int64_t kSampleRuns = 4096;              // the bracket's sample: 4096 runs of 16 keys
constexpr int64_t kMinSampled = int64_t{1} << 18;  // below this many entries, the full radix select is as fast

struct Params {
  std::vector<const float*> data;  // task t's scores of parameter i: data[i] + t * numels[i]
  std::vector<int64_t> numels;
  std::vector<int64_t> word_offsets;
};

// Histogram of digit `d` of the keys in x[0, n) whose bits above that digit equal `prefix`
// (all keys when d == 0). Counts are added into h (kSubHists x kBuckets, uint32).
template <int D>
void histogram(const float* x, int64_t n, uint32_t prefix, uint32_t* h) {
  constexpr int shift = kDigitShift[D];
  constexpr uint32_t dmask = (1u << kDigitBits[D]) - 1u;
  int64_t j = 0;
  for (; j + kSubHists <= n; j += kSubHists) {
    for (int s = 0; s < kSubHists; ++s) {
      const uint32_t key = float_key(x[j + s]);
      if constexpr (D == 0) {
        h[s * kBuckets + (key >> shift)]++;
      } else if ((key >> (shift + kDigitBits[D])) == prefix) {
        h[s * kBuckets + ((key >> shift) & dmask)]++;
      }
    }
  }
  for (; j < n; ++j) {
    const uint32_t key = float_key(x[j]);
    if constexpr (D == 0) {
      h[key >> shift]++;
    } else if ((key >> (shift + kDigitBits[D])) == prefix) {
      h[(key >> shift) & dmask]++;
    }
  }
}

// Like histogram<1> but also appends the matching keys and their global positions, in order.
void histogram_collect(const float* x, int64_t n, int64_t pos, uint32_t prefix, uint32_t* h, uint32_t* keys,
                       int64_t* positions, int64_t& count) {
  constexpr int shift = kDigitShift[1];
  constexpr uint32_t dmask = (1u << kDigitBits[1]) - 1u;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t key = float_key(x[j]);
    if ((key >> (shift + kDigitBits[1])) == prefix) {
      h[(j & (kSubHists - 1)) * kBuckets + ((key >> shift) & dmask)]++;
      keys[count] = key;
      positions[count] = pos + j;
      ++count;
    }
  }
}

// Number of keys in x[0, n) equal to `thr`.
int64_t count_equal(const float* x, int64_t n, uint32_t thr) {
  int64_t c = 0;
  for (int64_t j = 0; j < n; ++j) c += float_key(x[j]) == thr;
  return c;
}

// Mask words of one block: bit j is set iff key_j > gt, or key_j == eq and position_j <= last_pos.
// `first` is the position of x[0]; x[0] starts a word.
void write_words(const float* x, int64_t n, int64_t first, uint32_t gt, uint32_t eq, int64_t last_pos,
                 int32_t* words) {
  const int64_t n_words = (n + 31) / 32;
  for (int64_t w = 0; w < n_words; ++w) {
    const float* xw = x + w * 32;
    const int64_t len = std::min<int64_t>(32, n - w * 32);
    // Entries j <= tie_limit of this word are at or before last_pos.
    const int64_t tie_limit = std::clamp<int64_t>(last_pos - (first + w * 32), -1, 31);
    uint32_t word = 0;
    if (len == 32) {
      for (int j = 0; j < 32; ++j) {
        const uint32_t key = float_key(xw[j]);
        const uint32_t bit = (key > gt) | ((key == eq) & (j <= tie_limit));
        word |= bit << j;
      }
    } else {
      for (int j = 0; j < len; ++j) {
        const uint32_t key = float_key(xw[j]);
        const uint32_t bit = (key > gt) | ((key == eq) & (j <= tie_limit));
        word |= bit << j;
      }
    }
    words[w] = static_cast<int32_t>(word);
  }
}



// One word of the fused pass: bit j of *above is key_j > hi, bit j of *inside is lo <= key_j <= hi.
// Written branch-free over 32 entries so that it vectorizes.
static inline void classify_word(const float* x, uint32_t lo, uint32_t hi, uint32_t* above, uint32_t* inside) {
  uint32_t a = 0;
  uint32_t in = 0;
  for (int j = 0; j < 32; ++j) {
    const uint32_t key = float_key(x[j]);
    a |= static_cast<uint32_t>(key > hi) << j;
    in |= static_cast<uint32_t>((key >= lo) & (key <= hi)) << j;
  }
  *above = a;
  *inside = in;
}

// Fused pass over one block: writes the words of "key > hi" (the entries surely taken), counts them,
// and appends the keys in [lo, hi] (the candidates) with their packed location (global word << 5 | bit),
// in position order. Returns false when the candidate buffer (capacity `cap`) is full.
FSMTL_MULTIVERSION
bool classify_block(const float* x, int64_t n, uint32_t lo, uint32_t hi, int32_t* words, int64_t first_word,
                    int64_t& above, uint32_t* cand_keys, int64_t* cand_loc, int64_t& count, int64_t cap) {
  const int64_t full = n / 32;
  float tail[32];
  for (int64_t w = 0; w <= full; ++w) {
    const float* xw = x + w * 32;
    if (w == full) {
      const int64_t rest = n - full * 32;
      if (rest == 0) break;
      // A partial last word: pad with -inf; the padding bits are cleared below.
      for (int64_t j = 0; j < 32; ++j) tail[j] = j < rest ? xw[j] : -std::numeric_limits<float>::infinity();
      xw = tail;
    }
    uint32_t a, in;
    classify_word(xw, lo, hi, &a, &in);
    if (w == full) {
      const uint32_t valid = (1u << (n - full * 32)) - 1u;
      a &= valid;
      in &= valid;
    }
    words[w] = static_cast<int32_t>(a);
    above += __builtin_popcount(a);
    while (in) {
      if (count == cap) return false;
      const int bit = __builtin_ctz(in);
      in &= in - 1;
      cand_keys[count] = float_key(xw[bit]);
      cand_loc[count] = ((first_word + w) << 5) | bit;
      ++count;
    }
  }
  return true;
}

class TaskSelector {
 public:
  TaskSelector(const Params& p, const std::vector<Block>& blocks, const std::vector<int64_t>& chunks, int64_t total)
      : p_(p), blocks_(blocks), chunks_(chunks), total_(total), n_chunks_(static_cast<int64_t>(chunks.size()) - 1) {}

  // Writes task t's mask with exactly k ones into words (one row of [T, W]).
  void run(int64_t t, int64_t k, int32_t* words) {
    t_ = t;
    if (k == 0) {
      write_mask(words, 0xFFFFFFFFu, 0xFFFFFFFFu, -1);  // nothing is above the largest key, no tie is taken
      return;
    }
    if (k == total_) {
      write_mask(words, 0u, 0u, INT64_MAX);  // every key is > 0 or == 0 (taken)
      return;
    }
    if (total_ >= kMinSampled && sampled_select(k, words)) return;
    int64_t need = k;        // entries still to take among keys that match `prefix`
    uint32_t prefix = 0;     // the digits resolved so far
    int64_t in_bucket = 0;   // keys matching `prefix`
    bool compacted = false;
    std::vector<std::vector<uint32_t>> cand_keys;
    std::vector<std::vector<int64_t>> cand_pos;
    std::vector<int64_t> chunk_counts(n_chunks_, 0);  // per chunk, keys in the chosen bucket

    for (int d = 0; d < 3; ++d) {
      std::vector<int64_t> hist(static_cast<size_t>(n_chunks_) * kBuckets, 0);
      if (d == 0) {
        full_pass<0>(prefix, hist);
      } else if (d == 1 && in_bucket <= std::max<int64_t>(total_ / 8, 1 << 16)) {
        // Small bucket: copy its keys out now so that digit 2 and the ties read only them.
        collect_pass(prefix, chunk_counts, hist, cand_keys, cand_pos);
        compacted = true;
      } else if (compacted) {
        candidate_pass(prefix, hist, cand_keys);
      } else if (d == 1) {
        full_pass<1>(prefix, hist);
      } else {
        full_pass<2>(prefix, hist);
      }
      // Walk the buckets from the largest key down to the one holding the need-th key.
      const int buckets = 1 << kDigitBits[d];
      int64_t above = 0;
      int bucket = buckets - 1;
      for (;; --bucket) {
        int64_t c = 0;
        for (int64_t ch = 0; ch < n_chunks_; ++ch) c += hist[ch * kBuckets + bucket];
        if (above + c >= need) {
          in_bucket = c;
          for (int64_t ch = 0; ch < n_chunks_; ++ch) chunk_counts[ch] = hist[ch * kBuckets + bucket];
          break;
        }
        above += c;
      }
      need -= above;
      prefix = (prefix << kDigitBits[d]) | static_cast<uint32_t>(bucket);
      if (need == in_bucket) {
        // Early exit: the whole bucket is taken, so the mask is every key >= its smallest key.
        const uint32_t lowest = prefix << kDigitShift[d];
        write_mask(words, lowest - 1u, lowest, -1);  // lowest > 0 here, since k < P
        return;
      }
    }
    // prefix is now the exact k-th largest key; `need` of its `in_bucket` ties are taken.
    const uint32_t thr = prefix;
    const int64_t last_pos =
        compacted ? last_tie_in_candidates(thr, need, cand_keys, cand_pos) : last_tie_by_blocks(thr, need);
    write_mask(words, thr, thr, last_pos);
  }


  // Fast path, one read of the scores in the common case. A sample of the keys brackets the k-th
  // largest key in [lo, hi]; one fused pass writes the mask of keys > hi and collects the keys in
  // [lo, hi] with their locations; radix select over those candidates finds the exact threshold and
  // the ties to take, and their bits are set. Returns false (nothing decided; the caller runs the
  // full radix select, which rewrites every word) when the bracket misses the k-th key or holds too
  // many keys. Either way the result is exact; the sample only decides the speed.
  bool sampled_select(int64_t k, int32_t* words) {
    uint32_t lo, hi;
    double fraction;
    if (!bracket(k, lo, hi, fraction) || fraction > 0.125) return false;
    const double cap_fraction = std::min(1.0, 2.0 * fraction + 1.0 / 256.0);
    std::vector<std::vector<uint32_t>> keys(n_chunks_);
    std::vector<std::vector<int64_t>> locs(n_chunks_);
    std::vector<int64_t> above(n_chunks_, 0);
    std::vector<int64_t> counts(n_chunks_, 0);
    std::vector<char> ok(n_chunks_, 1);
    for_chunks([&](int64_t c) {
      int64_t len = 0;
      for (int64_t b = chunks_[c]; b < chunks_[c + 1]; ++b) len += blocks_[b].end - blocks_[b].begin;
      const int64_t cap = static_cast<int64_t>(cap_fraction * static_cast<double>(len)) + 64;
      keys[c].resize(cap);
      locs[c].resize(cap);
      for (int64_t b = chunks_[c]; b < chunks_[c + 1] && ok[c]; ++b) {
        const Block& blk = blocks_[b];
        const int64_t first_word = p_.word_offsets[blk.param] + blk.begin / 32;
        ok[c] = classify_block(block_data(blk), blk.end - blk.begin, lo, hi, words + first_word, first_word,
                               above[c], keys[c].data(), locs[c].data(), counts[c], cap);
      }
    });
    int64_t need = k;
    int64_t n_cand = 0;
    for (int64_t c = 0; c < n_chunks_; ++c) {
      if (!ok[c]) return false;
      need -= above[c];
      n_cand += counts[c];
    }
    if (need < 0 || need > n_cand) return false;  // the k-th key is outside [lo, hi]
    if (need == 0) return true;                   // exactly the keys > hi
    // A parallel region costs a wake-up of every thread (a scheduler tick when cores are shared), so
    // the few candidates of a tight bracket are handled by this thread alone.
    const bool many = n_cand > (int64_t{1} << 20);
    // Radix select of the need-th largest candidate, digits as in the full path, per-chunk histograms.
    uint32_t prefix = 0;
    std::vector<int64_t> chunk_ties(n_chunks_, 0);
    for (int d = 0; d < 3; ++d) {
      std::vector<int64_t> hist(static_cast<size_t>(n_chunks_) * kBuckets, 0);
      const int shift = kDigitShift[d];
      const uint32_t dmask = (1u << kDigitBits[d]) - 1u;
      const int high = shift + kDigitBits[d];
      for_chunks_if(many, [&](int64_t c) {
        int64_t* row = hist.data() + c * kBuckets;
        const uint32_t* ck = keys[c].data();
        for (int64_t j = 0; j < counts[c]; ++j) {
          if (high == 32 || (ck[j] >> high) == prefix) row[(ck[j] >> shift) & dmask]++;
        }
      });
      int64_t above_bucket = 0;
      int bucket = (1 << kDigitBits[d]) - 1;
      for (;; --bucket) {
        int64_t cnt = 0;
        for (int64_t c = 0; c < n_chunks_; ++c) cnt += hist[c * kBuckets + bucket];
        if (above_bucket + cnt >= need) {
          for (int64_t c = 0; c < n_chunks_; ++c) chunk_ties[c] = hist[c * kBuckets + bucket];
          break;
        }
        above_bucket += cnt;
      }
      need -= above_bucket;
      prefix = (prefix << kDigitBits[d]) | static_cast<uint32_t>(bucket);
    }
    // prefix is the threshold; `need` of its ties are taken, the first ones by position.
    const uint32_t thr = prefix;
    std::vector<int64_t> ties_before(n_chunks_, 0);
    for (int64_t c = 1; c < n_chunks_; ++c) ties_before[c] = ties_before[c - 1] + chunk_ties[c - 1];
    for_chunks_if(many, [&](int64_t c) {
      int64_t tie_rank = ties_before[c];
      for (int64_t j = 0; j < counts[c]; ++j) {
        const uint32_t key = keys[c][j];
        bool take = key > thr;
        if (key == thr) take = tie_rank++ < need;
        if (take) {
          const int64_t loc = locs[c][j];
          words[loc >> 5] |= static_cast<int32_t>(1u << (loc & 31));
        }
      }
    });
    return true;
  }

  // Brackets the k-th largest key from a sample of kSampleRuns runs of 16 consecutive entries spread
  // evenly over all positions: [lo, hi] holds the sample ranks k/P * m -/+ a margin of eight
  // standard deviations of a binomial rank (wide because keys within a run are correlated). `fraction` is
  // the share of the sample inside the bracket (an estimate of the candidates' share).
  bool bracket(int64_t k, uint32_t& lo, uint32_t& hi, double& fraction) const {
    std::vector<int64_t> starts(p_.numels.size() + 1, 0);
    for (size_t i = 0; i < p_.numels.size(); ++i) starts[i + 1] = starts[i] + p_.numels[i];
    std::vector<uint32_t> sample;
    sample.reserve(kSampleRuns * 16);
    for (int64_t r = 0; r < kSampleRuns; ++r) {
      const int64_t pos = (2 * r + 1) * total_ / (2 * kSampleRuns);
      const auto it = std::upper_bound(starts.begin(), starts.end(), pos) - 1;
      const int64_t param = it - starts.begin();
      const int64_t idx = pos - *it;
      const float* x = p_.data[param] + t_ * p_.numels[param];
      const int64_t end = std::min<int64_t>(p_.numels[param], idx + 16);
      for (int64_t j = idx; j < end; ++j) sample.push_back(float_key(x[j]));
    }
    const int64_t m = static_cast<int64_t>(sample.size());
    const double q = static_cast<double>(k) / static_cast<double>(total_);
    const double mid = q * static_cast<double>(m);
    const double margin = 8.0 * std::sqrt(static_cast<double>(m) * q * (1.0 - q)) + 32.0;
    const int64_t hi_rank = static_cast<int64_t>(std::floor(mid - margin));  // 0 = the largest
    const int64_t lo_rank = static_cast<int64_t>(std::ceil(mid + margin));
    auto by_rank = [&](int64_t rank) {  // key of descending rank `rank` in the sample
      std::nth_element(sample.begin(), sample.begin() + (m - 1 - rank), sample.end());
      return sample[m - 1 - rank];
    };
    hi = hi_rank < 0 ? 0xFFFFFFFFu : by_rank(hi_rank);
    lo = lo_rank >= m ? 0u : by_rank(lo_rank);
    if (lo == 0) return false;  // the bracket reaches the smallest keys: no saving over radix select
    int64_t inside = 0;
    for (const uint32_t key : sample) inside += (key >= lo) & (key <= hi);
    fraction = static_cast<double>(inside) / static_cast<double>(m);
    return true;
  }

 private:
  const float* block_data(const Block& b) const { return p_.data[b.param] + t_ * p_.numels[b.param] + b.begin; }

  template <typename F>
  void for_chunks(const F& f) const {
    at::parallel_for(0, n_chunks_, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) f(c);
    });
  }

  template <typename F>
  void for_chunks_if(bool parallel, const F& f) const {
    if (parallel) {
      for_chunks(f);
    } else {
      for (int64_t c = 0; c < n_chunks_; ++c) f(c);
    }
  }

  // Sums the kSubHists interleaved uint32 histograms of one chunk into its int64 row.
  static void flush(uint32_t* local, int64_t* row, int buckets) {
    for (int s = 0; s < kSubHists; ++s) {
      for (int b = 0; b < buckets; ++b) {
        row[b] += local[s * kBuckets + b];
        local[s * kBuckets + b] = 0;
      }
    }
  }

  template <int D>
  void full_pass(uint32_t prefix, std::vector<int64_t>& hist) const {
    for_chunks([&](int64_t c) {
      std::vector<uint32_t> local(kSubHists * kBuckets, 0);
      int64_t since_flush = 0;
      for (int64_t b = chunks_[c]; b < chunks_[c + 1]; ++b) {
        const Block& blk = blocks_[b];
        histogram<D>(block_data(blk), blk.end - blk.begin, prefix, local.data());
        since_flush += blk.end - blk.begin;
        if (since_flush > (int64_t{1} << 31)) {  // keep every uint32 counter below overflow
          flush(local.data(), hist.data() + c * kBuckets, kBuckets);
          since_flush = 0;
        }
      }
      flush(local.data(), hist.data() + c * kBuckets, kBuckets);
    });
  }

  // Digit 1 over all keys, copying the keys that match the first digit (and their positions) into
  // per-chunk buffers sized exactly from the first pass's per-chunk counts.
  void collect_pass(uint32_t prefix, const std::vector<int64_t>& chunk_counts, std::vector<int64_t>& hist,
                    std::vector<std::vector<uint32_t>>& keys, std::vector<std::vector<int64_t>>& positions) const {
    keys.assign(n_chunks_, {});
    positions.assign(n_chunks_, {});
    for_chunks([&](int64_t c) {
      std::vector<uint32_t> local(kSubHists * kBuckets, 0);
      auto& ck = keys[c];
      auto& cp = positions[c];
      ck.resize(chunk_counts[c]);
      cp.resize(chunk_counts[c]);
      int64_t count = 0;
      int64_t since_flush = 0;
      for (int64_t b = chunks_[c]; b < chunks_[c + 1]; ++b) {
        const Block& blk = blocks_[b];
        const int64_t n = blk.end - blk.begin;
        histogram_collect(block_data(blk), n, blk.pos, prefix, local.data(), ck.data(), cp.data(), count);
        since_flush += n;
        if (since_flush > (int64_t{1} << 31)) {
          flush(local.data(), hist.data() + c * kBuckets, kBuckets);
          since_flush = 0;
        }
      }
      flush(local.data(), hist.data() + c * kBuckets, kBuckets);
    });
  }

  // Digit 2 over the collected candidates (they all match the first digit).
  void candidate_pass(uint32_t prefix, std::vector<int64_t>& hist,
                      const std::vector<std::vector<uint32_t>>& keys) const {
    constexpr uint32_t dmask = (1u << kDigitBits[2]) - 1u;
    for_chunks([&](int64_t c) {
      int64_t* row = hist.data() + c * kBuckets;
      for (const uint32_t key : keys[c]) {
        if ((key >> kDigitBits[2]) == prefix) row[key & dmask]++;
      }
    });
  }

  // Position of the need-th key equal to thr, scanning the candidates in position order.
  static int64_t last_tie_in_candidates(uint32_t thr, int64_t need, const std::vector<std::vector<uint32_t>>& keys,
                                        const std::vector<std::vector<int64_t>>& positions) {
    for (size_t c = 0; c < keys.size(); ++c) {
      for (size_t j = 0; j < keys[c].size(); ++j) {
        if (keys[c][j] == thr && --need == 0) return positions[c][j];
      }
    }
    TORCH_CHECK(false, "topk_mask: internal error, fewer ties than counted");
  }

  // Same, without candidates: per-block tie counts (parallel), a prefix sum to find the block of
  // the need-th tie, then a scan of that block.
  int64_t last_tie_by_blocks(uint32_t thr, int64_t need) const {
    std::vector<int64_t> ties(blocks_.size(), 0);
    for_chunks([&](int64_t c) {
      for (int64_t b = chunks_[c]; b < chunks_[c + 1]; ++b) {
        ties[b] = count_equal(block_data(blocks_[b]), blocks_[b].end - blocks_[b].begin, thr);
      }
    });
    for (size_t b = 0; b < blocks_.size(); ++b) {
      if (ties[b] < need) {
        need -= ties[b];
        continue;
      }
      const float* x = block_data(blocks_[b]);
      for (int64_t j = 0;; ++j) {
        if (float_key(x[j]) == thr && --need == 0) return blocks_[b].pos + j;
      }
    }
    TORCH_CHECK(false, "topk_mask: internal error, fewer ties than counted");
  }

  void write_mask(int32_t* words, uint32_t gt, uint32_t eq, int64_t last_pos) const {
    for_chunks([&](int64_t c) {
      for (int64_t b = chunks_[c]; b < chunks_[c + 1]; ++b) {
        const Block& blk = blocks_[b];
        int32_t* out = words + p_.word_offsets[blk.param] + blk.begin / 32;
        write_words(block_data(blk), blk.end - blk.begin, blk.pos, gt, eq, last_pos, out);
      }
    });
  }

  const Params& p_;
  const std::vector<Block>& blocks_;
  const std::vector<int64_t>& chunks_;
  const int64_t total_;
  const int64_t n_chunks_;
  int64_t t_ = 0;
};

}  // namespace

// The CPU kernel of torch.ops.fsmtl.topk_mask (schema in fsmtl_kernels/topk_mask.py): parameter i's
// bits go to words [word_offsets[i], word_offsets[i] + ceil(n_i / 32)) of each task's row of n_words
// words, the layout fsmtl_kernels.packed_mask.word_layout gives.
at::Tensor topk_mask_cpu(at::TensorList scores, at::IntArrayRef ks, at::IntArrayRef word_offsets, int64_t n_words) {
  TORCH_CHECK(!scores.empty(), "topk_mask: scores must not be empty");
  TORCH_CHECK(word_offsets.size() == scores.size(), "topk_mask: word_offsets has ", word_offsets.size(),
              " entries but scores has ", scores.size());
  const int64_t num_tasks = scores[0].dim() > 0 ? scores[0].size(0) : 0;
  TORCH_CHECK(static_cast<int64_t>(ks.size()) == num_tasks, "topk_mask: ks has ", ks.size(), " entries but there are ",
              num_tasks, " tasks");
  Params p;
  int64_t total = 0;
  for (size_t i = 0; i < scores.size(); ++i) {
    const auto& s = scores[i];
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous(), "topk_mask: scores[", i,
                "] must be a contiguous float32 CPU tensor");
    TORCH_CHECK(s.dim() >= 1 && s.size(0) == num_tasks, "topk_mask: scores[", i, "] must be [T, ...] with T = ",
                num_tasks);
    const int64_t n = num_tasks ? s.numel() / num_tasks : 0;
    TORCH_CHECK(word_offsets[i] >= 0 && word_offsets[i] + (n + 31) / 32 <= n_words, "topk_mask: word_offsets[", i,
                "] is out of range");
    p.data.push_back(s.const_data_ptr<float>());
    p.numels.push_back(n);
    p.word_offsets.push_back(word_offsets[i]);
    total += n;
  }
  for (int64_t t = 0; t < num_tasks; ++t) {
    TORCH_CHECK(ks[t] >= 0 && ks[t] <= total, "topk_mask: ks[", t, "]=", ks[t], " is out of range [0, ", total, "]");
  }
  // Zeroed: words outside every parameter's range (none in word_layout's layout) stay 0.
  at::Tensor words = at::zeros({num_tasks, n_words}, scores[0].options().dtype(at::kInt));
  if (total == 0 || num_tasks == 0) return words;
  const auto blocks = make_blocks(p.numels, kTopkBlock);
  const auto chunks = make_chunks(blocks, total, at::get_num_threads(), kMinChunk);
  TaskSelector selector(p, blocks, chunks, total);
  for (int64_t t = 0; t < num_tasks; ++t) selector.run(t, ks[t], words.data_ptr<int32_t>() + t * n_words);
  return words;
}

}  // namespace fsmtl

TORCH_LIBRARY_IMPL(fsmtl, CPU, m) { m.impl("topk_mask", &fsmtl::topk_mask_cpu); }
