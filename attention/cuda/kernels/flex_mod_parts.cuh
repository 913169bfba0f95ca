// The generated mods evaluated in parts (attention/mod_codegen.h): values that need neither kv nor the
// score once per q row, values that need kv but neither q nor the score once per kv column, the rest
// per element. Shared by the forward and backward templates; NVRTC only, after the generated mods.
//
// Where a part is evaluated matters for errors: a captured read may raise (FgError), and it must raise
// exactly where the CPU would, i.e. only for entries the kernel really evaluates. So a row's parts are
// computed only when the row has an in-range entry that reaches the mod (any visited block for the
// score_mod, any partial block for the mask_mod), and a column's only when it is in range (and, for the
// mask_mod, in a partial block).
#pragma once

// The per-row parts of one q row: the score_mod's when the row reaches any visited block, the mask_mod's
// when it reaches a partial one.
template <class T>
struct FgRowMods {
  FgScoreRow<T> s;
  FgMaskRow<T> m;
};
template <class T>
__device__ __forceinline__ void fg_row_mods(FgRowMods<T>& r, bool any_block, bool any_partial, int b, int h, int qi,
                                            const FgModArgs& args) {
#if FG_HAS_SCORE_MOD
  if (any_block) r.s = fg_score_row<T>(b, h, qi, args);
#endif
#if FG_HAS_MASK_MOD
  if (any_partial) r.m = fg_mask_row<T>(b, h, qi, args);
#endif
}
// The per-column parts of one in-range kv column (the mask_mod's in partial blocks only).
template <class T>
struct FgColMods {
  FgScoreCol<T> s;
  FgMaskCol<T> m;
};
template <class T>
__device__ __forceinline__ FgColMods<T> fg_col_mods(bool in_range, bool partial, int b, int h, int kvi,
                                                    const FgModArgs& args) {
  FgColMods<T> c;
#if FG_HAS_SCORE_MOD
  if (in_range) c.s = fg_score_col<T>(b, h, kvi, args);
#endif
#if FG_HAS_MASK_MOD
  if (in_range && partial) c.m = fg_mask_col<T>(b, h, kvi, args);
#endif
  return c;
}

