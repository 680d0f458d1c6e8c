"""Compiled per-row softmax statistics of one block of query rows (numba, ``cache=True``).

Everything the row kernel needs is in this one file on purpose: numba's on-disk cache of a
function is invalidated when *its* source file changes, not when a jitted function it calls
changes in another file, so splitting the kernel across files could leave a stale cache.

For a query row with raw scores ``x_j = q . k_j / sqrt(d)`` over its visible keys
``j = lo .. hi-1`` and a query scale ``s``:

    a_j = x_j - max_j x_j                          (<= 0, 0 at the row's largest score)
    R_j = exp(max(a_j / 4, -708))                  (one exp per score)
    P_j = R_j ** m  when s = m / 4 (m an integer <= 64), else exp(max(s a_j, -708))
    tot = 1 + rest,  rest = sum of P_j over every key but the top one (whose P is 1)
    weights p_j = P_j / tot
    entropy  = log1p(rest) - s * sum_j P_j a_j / tot  (= -sum p log p, both terms >= 0; log1p
               keeps sharp rows, where rest is tiny, to full relative precision)
    max_attn = 1 / tot                             (P = 1 at the largest score)
    row_std  = sqrt(sum_j (P_j - tot/n)^2 / n) / tot   (population std, two-pass)
    k_eff    = fewest keys, largest weight first, whose mass reaches (0.9 - 1e-12) * tot

Powers of R are built by repeated multiplication following a fixed program (`scale_plan`),
so a weight does not depend on which other scales are computed. The exp floor keeps libm's
slow underflow path out (every power m >= 2 of exp(-708) underflows to 0, as the true weight
does).

k_eff needs no sort: the row's keys are binned by ``a`` (the weights' order is the same at
every scale), the bin masses locate the bin where the cumulative mass crosses the threshold,
and only that bin is refined (sub-binned again, and sorted once it holds at most 16 keys).

Checks read from the positions, not from the ranges the rows were given: the largest weight
on a key after the query (``future``) or outside its sliding window (``window``), and
``|sum of the bin masses / tot - 1|`` (the weights re-summed in another order).

Sums use interleaved partial sums in a fixed order (two lanes for the per-bin sums, four for the
others; no fastmath), so results do not depend on the CPU's vector width. numba keeps LLVM's SLP
vectoriser off, so the hot reductions are written as explicit vector loops (`_bin_sums`,
`_std_sums`, `_shared_sums`, `_distance_sums`: lane ``c`` adds the elements ``c, c + lanes, ..`` in
order, the bits of the scalar partial sums).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .kernel_layout import EXTRA_FIELDS, N_BINS, OUT_FIELDS, ROW_FIELDS  # noqa: F401 (the layout block_stats uses)

EXP_FLOOR = -708.0  # exp() arguments are raised to this (exp(-708) ~ 3e-308)
K_EFF_MASS = 0.9
K_EFF_TOL = 1e-12  # ten weights of 0.1 reach 0.9 despite summation rounding
SMALL_SET = 16  # sort the boundary bin once it holds at most this many keys
TINY_MASS = 1e-250  # query variation: below this, renormalise the shared keys from their scores

_JIT = dict(cache=True, nogil=True, error_model="numpy")
_INNER = dict(_JIT, no_cpython_wrapper=True, no_cfunc_wrapper=True)  # called from the kernel only


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float64 whose IEEE bits are the int64 ``bits``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))
    return types.float64(types.int64), codegen


@intrinsic
def _bits_of(typingctx, x):
    """The IEEE bits of the float64 ``x`` as an int64."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int64))
    return types.int64(types.float64), codegen


def _as_index(context, builder, value, valty):
    return context.cast(builder, value, valty, types.intp)


# numba leaves LLVM's SLP vectoriser off (numba#8705), so the interleaved partial sums of the
# reductions below ran one lane at a time; these intrinsics emit the same sums as explicit vector
# loops: lane ``c`` of a ``lanes``-wide accumulator adds the elements ``c, c + lanes, ...`` in the
# same order as the scalar partial sums did, so the results are the same bits
def _vector_load(context, builder, arrty, arr, idx, lanes):
    """Elements ``idx .. idx + lanes - 1`` of ``arr`` (``idx`` an intp) as a <lanes x double>."""
    first = builder.gep(context.make_array(arrty)(context, builder, arr).data, [idx], inbounds=True)
    return builder.load(builder.bitcast(first, ir.PointerType(ir.VectorType(ir.DoubleType(), lanes))), align=8)


def _splat(builder, value, lanes):
    """<lanes x double> with every lane ``value``."""
    vec = ir.Constant(ir.VectorType(ir.DoubleType(), lanes), ir.Undefined)
    for c in range(lanes):
        vec = builder.insert_element(vec, value, ir.Constant(ir.IntType(32), c))
    return vec


def _lane_sums(context, builder, lanes, n_acc, start, stop, update):
    """Run ``accs = update(j, accs)`` for j = start, start + lanes, .. < stop (``stop - start`` a
    multiple of ``lanes``) over ``n_acc`` zeroed <lanes x double> accumulators; their lanes, in
    order, as a flat list of doubles."""
    vec = ir.VectorType(ir.DoubleType(), lanes)
    slots = [cgutils.alloca_once_value(builder, ir.Constant(vec, [0.0] * lanes)) for _ in range(n_acc)]
    intp = context.get_value_type(types.intp)
    with cgutils.for_range_slice(builder, start, stop, ir.Constant(intp, lanes), intp) as (j, _):
        new = update(j, [builder.load(a) for a in slots])
        for a, v in zip(slots, new):
            builder.store(v, a)
    return [builder.extract_element(builder.load(a), ir.Constant(ir.IntType(32), c))
            for a in slots for c in range(lanes)]


def _is_float_vector(arr) -> bool:
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype == types.float64


@intrinsic
def _bin_sums(typingctx, p, a, start, stop):
    """2-lane sums over ``j = start .. stop-1`` (``stop - start`` even): lanes of ``sum p[j]`` then of
    ``sum p[j] * a[j]``, as (t0, t1, u0, u1)."""
    if not (_is_float_vector(p) and _is_float_vector(a)):
        return None

    def codegen(context, builder, signature, args):
        pty, aty, sty, ety = signature.args

        def update(j, accs):
            pv = _vector_load(context, builder, pty, args[0], j, 2)
            av = _vector_load(context, builder, aty, args[1], j, 2)
            return [builder.fadd(accs[0], pv), builder.fadd(accs[1], builder.fmul(pv, av))]
        lanes = _lane_sums(context, builder, 2, 2, _as_index(context, builder, args[2], sty),
                           _as_index(context, builder, args[3], ety), update)
        return context.make_tuple(builder, signature.return_type, lanes)
    return types.UniTuple(types.float64, 4)(p, a, start, stop), codegen


@intrinsic
def _std_sums(typingctx, p, stop, mu):
    """4-lane sums over ``j = 0 .. stop-1`` (``stop`` a multiple of 4): lanes of ``sum p[j]`` then
    of ``sum (p[j] - mu)**2``, as (v0, .., v3, d0, .., d3)."""
    if not _is_float_vector(p):
        return None

    def codegen(context, builder, signature, args):
        intp = context.get_value_type(types.intp)
        mu_v = _splat(builder, context.cast(builder, args[2], signature.args[2], types.float64), 4)

        def update(j, accs):
            x = _vector_load(context, builder, signature.args[0], args[0], j, 4)
            dev = builder.fsub(x, mu_v)
            return [builder.fadd(accs[0], x), builder.fadd(accs[1], builder.fmul(dev, dev))]
        lanes = _lane_sums(context, builder, 4, 2, ir.Constant(intp, 0),
                           _as_index(context, builder, args[1], signature.args[1]), update)
        return context.make_tuple(builder, signature.return_type, lanes)
    return types.UniTuple(types.float64, 8)(p, stop, mu), codegen


@intrinsic
def _shared_sums(typingctx, e, e_off, p, stop):
    """4-lane sums over ``j = 0 .. stop-1`` (``stop`` a multiple of 4): lanes of ``sum e[e_off + j]``
    then of ``sum p[j]``, as (e0, .., e3, l0, .., l3)."""
    if not (_is_float_vector(e) and _is_float_vector(p)):
        return None

    def codegen(context, builder, signature, args):
        ety, oty, pty, sty = signature.args
        off = _as_index(context, builder, args[1], oty)

        def update(j, accs):
            ev = _vector_load(context, builder, ety, args[0], builder.add(off, j), 4)
            pv = _vector_load(context, builder, pty, args[2], j, 4)
            return [builder.fadd(accs[0], ev), builder.fadd(accs[1], pv)]
        lanes = _lane_sums(context, builder, 4, 2, ir.Constant(off.type, 0),
                           _as_index(context, builder, args[3], sty), update)
        return context.make_tuple(builder, signature.return_type, lanes)
    return types.UniTuple(types.float64, 8)(e, e_off, p, stop), codegen


@intrinsic
def _distance_sums(typingctx, e, e_off, p, ratio, stop):
    """4-lane sums over ``j = 0 .. stop-1`` (``stop`` a multiple of 4) of ``(e[e_off + j] - p[j] *
    ratio)**2``, as (c0, .., c3)."""
    if not (_is_float_vector(e) and _is_float_vector(p)):
        return None

    def codegen(context, builder, signature, args):
        ety, oty, pty, rty, sty = signature.args
        off = _as_index(context, builder, args[1], oty)
        ratio_v = _splat(builder, context.cast(builder, args[3], rty, types.float64), 4)

        def update(j, accs):
            ev = _vector_load(context, builder, ety, args[0], builder.add(off, j), 4)
            pv = _vector_load(context, builder, pty, args[2], j, 4)
            x = builder.fsub(ev, builder.fmul(pv, ratio_v))
            return [builder.fadd(accs[0], builder.fmul(x, x))]
        lanes = _lane_sums(context, builder, 4, 1, ir.Constant(off.type, 0),
                           _as_index(context, builder, args[4], sty), update)
        return context.make_tuple(builder, signature.return_type, lanes)
    return types.UniTuple(types.float64, 4)(e, e_off, p, ratio, stop), codegen


_SHIFTER = 6755399441055744.0  # 1.5 * 2**52: x + _SHIFTER rounds x to an integer kept in the low bits
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * _LN2_HI is exact for |k| < 2**11
_LN2_LO = 1.90821492927058770002e-10
_INV_FACT = tuple(1.0 / math.factorial(i) for i in range(14))


# compiled once and inlined by LLVM where it is called (numba's own inline="always" re-typed it at
# each call site: ~0.6-1 CPU s more compile, same machine code); the tests call it from Python
@njit("float64(float64)", **_JIT)
def exp_nonpositive(x):
    """exp(x) for EXP_FLOOR <= x <= 0 with an error below 1.5 ulp (1.09 measured against a float80
    reference; a correctly rounded exp has 0.5), branch-free so that loops over it vectorise: x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite), exp(r) by its Taylor polynomial
    of degree 13 (truncation < 1e-17 relative), times 2**k built from its bits (k >= -1022 for
    x >= -708, so no subnormal result)."""
    t = x * _LOG2E + _SHIFTER
    k = t - _SHIFTER
    r = (x - k * _LN2_HI) - k * _LN2_LO
    c = _INV_FACT
    p = c[13]
    p = p * r + c[12]
    p = p * r + c[11]
    p = p * r + c[10]
    p = p * r + c[9]
    p = p * r + c[8]
    p = p * r + c[7]
    p = p * r + c[6]
    p = p * r + c[5]
    p = p * r + c[4]
    p = p * r + c[3]
    p = p * r + c[2]
    p = p * r + 1.0
    p = p * r + 1.0
    return p * _float_from_bits((_bits_of(t) - _bits_of(_SHIFTER) + 1023) << 52)



@njit(**_JIT)
def block_stats(scores, c0, rows, pair_ptr, pairs, keys, window, want_extras, has_codes,
                prog, n_slots, scale_slot, scale_val, one, ring, ring_span, work, iwork, bin_f, bin_i,
                out, out_keff, extras, checks, qvar):
    """Statistics of the block's query rows ``i`` (the columns of ``rows``, fields ROW_FIELDS):
    keys ``lo[i] .. hi[i]-1`` of the example (``keys[0]`` positions, ``keys[1]`` token codes),
    whose raw scores are ``scores[i, lo[i]-c0 : hi[i]-c0]``.

    Per row and scale ``k`` (``scale_val[k]``; weights from power slot ``scale_slot[k]`` or,
    when -1, a direct exp) into ``out[:, out_row[i], k]`` (OUT_FIELDS) and ``out_keff``. At the
    scale ``one`` (1.0; -1 when absent) and with ``want_extras``, into ``extras[:, out_row[i]]``
    (EXTRA_FIELDS): the mean weight per key of the near keys (index >= ``near_lo[i]``) and of
    the far ones, and, with ``has_codes``, of the keys with the query's token and of the others
    (own position left out; code -1 = unknown). Query variation: for each pair ``p`` of
    ``pair_ptr[i] .. pair_ptr[i+1]-1``, the early row of rank ``pairs[0, p]`` (held in the ring)
    is compared over the shared keys ``lo[i] .. hi_early-1`` and the L2 distance of the two
    renormalised rows added to ``qvar[pairs[1, p]] = [sum, count]``. Rows with ``is_early``
    keep their scale-1 weights and shifted scores in ``ring[0 | 1, rank % ring size]`` (their key
    range in ``ring_span``). ``checks``: running maxima of the row-sum error, the future weight
    and the out-of-window weight (NaN counts as infinite). ``window`` 0 means full causal
    attention.

    Each row's keys are first put in order of their score bin (a counting sort; bins of equal
    width in score, highest first), so every scale's bin masses are sums over contiguous
    segments. Scratch: ``work`` (n_slots + 4, >= keys of a row) float64, ``iwork`` (3, same)
    int64, ``bin_f`` (2, N_BINS + 1) float64, ``bin_i`` (4, N_BINS + 1) int64.
    """
    n_s = scale_val.shape[0]
    ring_size = ring.shape[1]
    pq, lo, hi = rows[0], rows[1], rows[2]
    out_row, rank, is_early = rows[4], rows[5], rows[6]
    kpos = keys[0]
    sa = work[n_slots]  # shifted scores, in bin order
    direct = work[n_slots + 1]  # weights of a scale off the power grid, in bin order
    p_key = work[n_slots + 2]  # scale-1 weights in key order
    a_key = work[n_slots + 3]  # shifted scores in key order
    bins = iwork[0]  # bin of each key (key order)
    key_of = iwork[1]  # key (offset from lo) at each bin-order place
    idx = iwork[2]  # k_eff: candidate places
    mass = bin_f[0]
    sub_mass = bin_f[1]
    cnt = bin_i[0]
    off = bin_i[1]  # first place of each bin
    fill = bin_i[2]
    sub_cnt = bin_i[3]
    for i in range(scores.shape[0]):
        n = hi[i] - lo[i]
        if n <= 0:
            continue
        row = scores[i]
        j0 = lo[i] - c0
        top = low = row[j0]
        for j in range(j0, j0 + n - n % 2, 2):  # two chains: the compare latency is the cost
            top = max(top, max(row[j], row[j + 1]))
            low = min(low, min(row[j], row[j + 1]))
        if n % 2:
            top = max(top, row[j0 + n - 1])
            low = min(low, row[j0 + n - 1])
        # ~sqrt(n) bins balance the per-bin loop overhead against the boundary bin's size
        nb = min(N_BINS, max(1, int(math.sqrt(n))))
        to_bin = nb / (top - low) if top > low else 0.0
        for b in range(nb):
            cnt[b] = 0
        for j in range(n):
            b = min(int((top - row[j0 + j]) * to_bin), nb - 1)
            bins[j] = b
            cnt[b] += 1
        off[0] = 0
        for b in range(nb):
            off[b + 1] = off[b] + cnt[b]
            fill[b] = off[b]
        for j in range(n):
            x = row[j0 + j] - top
            a_key[j] = x
            place = fill[bins[j]]
            fill[bins[j]] = place + 1
            sa[place] = x
            key_of[place] = j
        # the (first) top key goes to place 0: its weight is exactly 1 at every scale, and the
        # others' mass ``rest`` gives log(tot) = log1p(rest) to full precision on sharp rows
        for j in range(off[1]):
            if sa[j] == 0.0:
                sa[j], sa[0] = sa[0], sa[j]
                key_of[j], key_of[0] = key_of[0], key_of[j]
                break
        base = work[0]
        for j in range(n):
            base[j] = exp_nonpositive(max(sa[j] * 0.25, EXP_FLOOR))
        for t in range(prog.shape[0]):
            dst, s1, s2 = work[prog[t, 0]], work[prog[t, 1]], work[prog[t, 2]]
            for j in range(n):
                dst[j] = s1[j] * s2[j]
        p_row = pq[i]
        # keys after the query or outside its window (none when the ranges are right)
        misplaced = kpos[hi[i] - 1] > p_row or (window > 0 and kpos[lo[i]] <= p_row - window)
        r = out_row[i]
        for k in range(n_s):
            s = scale_val[k]
            if scale_slot[k] >= 0:
                p = work[scale_slot[k]]
            else:
                for j in range(n):
                    direct[j] = exp_nonpositive(max(s * sa[j], EXP_FLOOR))
                p = direct
            rest = pa = 0.0  # rest: the mass of every key but the top one (place 0, weight 1)
            for b in range(nb):
                start = 1 if b == 0 else off[b]
                end = off[b + 1]
                end2 = end - (end - start) % 2
                t0, t1, u0, u1 = _bin_sums(p, sa, start, end2)
                if end2 < end:
                    t0 += p[end2]
                    u0 += p[end2] * sa[end2]
                mass[b] = t0 + t1
                rest += mass[b]
                pa += u0 + u1
            mass[0] += 1.0
            tot = 1.0 + rest
            inv = 1.0 / tot
            out[0, r, k] = math.log1p(rest) - s * pa * inv
            out[1, r, k] = inv
            # population std (second pass), and the weights re-summed in another order
            mu = tot / n
            n4 = n - n % 4
            v0, v1, v2, v3, d0, d1, d2, d3 = _std_sums(p, n4, mu)
            for j in range(n4, n):
                x0 = p[j]
                v0 += x0
                d0 += (x0 - mu) * (x0 - mu)
            out[2, r, k] = math.sqrt(((d0 + d1) + (d2 + d3)) / n) * inv
            err = abs(((v0 + v1) + (v2 + v3)) * inv - 1.0)
            if not err <= checks[0]:
                checks[0] = err if err == err else math.inf
            # k_eff: the bin where the cumulative mass crosses the threshold, then inside it
            thr = (K_EFF_MASS - K_EFF_TOL) * tot
            cum = 0.0
            edge = 0
            while edge < nb - 1 and cum + mass[edge] < thr:
                cum += mass[edge]
                edge += 1
            m = 0
            for j in range(off[edge], off[edge + 1]):
                idx[m] = j
                m += 1
            out_keff[r, k] = min(off[edge] + _k_eff_inside(p, sa, idx, m, cum, thr, sub_mass, sub_cnt), n)
            if misplaced:  # the largest weight on a future / out-of-window key
                for j in range(n):
                    w = p[j] * inv
                    kp = kpos[lo[i] + key_of[j]]
                    if kp > p_row and not w <= checks[1]:
                        checks[1] = w if w == w else math.inf
                    if window > 0 and kp <= p_row - window and not w <= checks[2]:
                        checks[2] = w if w == w else math.inf
            if k != one:
                continue
            for j in range(n):
                p_key[key_of[j]] = p[j]
            if want_extras:
                _local_and_token(p_key, inv, n, i, r, rows, keys, has_codes, extras)
            for q in range(pair_ptr[i], pair_ptr[i + 1]):
                slot = pairs[0, q] % ring_size
                d = _pair_distance(ring[0, slot], ring[1, slot], p_key, a_key, lo[i], ring_span[1, slot])
                qvar[pairs[1, q], 0] += d
                qvar[pairs[1, q], 1] += 1.0
            if is_early[i]:
                slot = rank[i] % ring_size
                ring_span[0, slot] = lo[i]
                ring_span[1, slot] = hi[i]
                for j in range(n):
                    ring[0, slot, lo[i] + j] = p_key[j]
                    ring[1, slot, lo[i] + j] = a_key[j]


@njit("int64(float64[::1], float64[::1], int64[::1], int64, float64, float64, float64[::1], int64[::1])", **_INNER)
def _k_eff_inside(p, a, idx, m, cum, thr, mass, cnt):
    """How many of the keys ``idx[:m]`` (one bin: weights ``p``, shifted scores ``a``), taken
    largest first, bring ``cum`` to ``thr`` (``m`` if rounding keeps them short).

    Re-bins the candidates by score (~4 per sub-bin, over their own range) and keeps the
    sub-bin where the threshold is crossed, until at most SMALL_SET remain (sorted and summed)
    or all scores are equal (equal weights). ``mass``/``cnt`` are scratch; ``idx`` is
    reordered."""
    count = 0
    while m > SMALL_SET:
        amin = amax = a[idx[0]]
        for x in range(m):
            amin = min(amin, a[idx[x]])
            amax = max(amax, a[idx[x]])
        if amax <= amin:
            break
        nb = min(N_BINS, max(2, m // 4))  # ~4 keys per sub-bin
        to_bin = nb / (amax - amin)
        for b in range(nb):
            mass[b] = 0.0
            cnt[b] = 0
        for x in range(m):
            c = min(int((amax - a[idx[x]]) * to_bin), nb - 1)
            mass[c] += p[idx[x]]
            cnt[c] += 1
        b = 0
        while b < nb - 1 and cum + mass[b] < thr:
            cum += mass[b]
            count += cnt[b]
            b += 1
        keep = 0
        for x in range(m):
            if min(int((amax - a[idx[x]]) * to_bin), nb - 1) == b:
                idx[keep] = idx[x]
                keep += 1
        m = keep
    if m <= SMALL_SET:
        for x in range(1, m):  # insertion sort, largest weight first
            v = idx[x]
            y = x - 1
            while y >= 0 and p[idx[y]] < p[v]:
                idx[y + 1] = idx[y]
                y -= 1
            idx[y + 1] = v
    for x in range(m):
        cum += p[idx[x]]
        count += 1
        if cum >= thr:
            return count
    return count


@njit("void(float64[::1], float64, int64, int64, int64, int64[:, ::1], int64[:, ::1], boolean, float64[:, ::1])", **_INNER)
def _local_and_token(p, inv, n, i, r, rows, keys, has_codes, extras):
    """Scale-1 extras of row ``i`` (output row ``r``): mean weight per near / far key, and per
    same-token / other-token key."""
    lo = rows[1, i]
    split = rows[3, i] - lo
    f0 = f1 = f2 = f3 = near = 0.0
    split4 = split - split % 4
    for j in range(0, split4, 4):
        f0 += p[j]
        f1 += p[j + 1]
        f2 += p[j + 2]
        f3 += p[j + 3]
    for j in range(split4, split):
        f0 += p[j]
    for j in range(split, n):
        near += p[j]
    extras[0, r] = near * inv / (n - split) if n > split else np.nan
    extras[1, r] = ((f0 + f1) + (f2 + f3)) * inv / split if split > 0 else np.nan
    if not has_codes:
        return
    qc = rows[7, i]
    same = diff = 0.0
    n_same = n_diff = 0
    if qc >= 0:
        own = rows[0, i]
        for j in range(n):
            kc = keys[1, lo + j]
            if kc < 0 or keys[0, lo + j] == own:  # unknown token, or the query's own position
                continue
            if kc == qc:
                same += p[j]
                n_same += 1
            else:
                diff += p[j]
                n_diff += 1
    extras[2, r] = same * inv / n_same if n_same > 0 else np.nan
    extras[3, r] = diff * inv / n_diff if n_diff > 0 else np.nan


@njit("float64(float64[::1], float64[::1], float64[::1], float64[::1], int64, int64)", **_INNER)
def _pair_distance(e_row, e_a, p, a, sh_lo, sh_hi):
    """L2 distance between the early row (weights ``e_row``, shifted scores ``e_a``, indexed by
    key) and the late row (``p``, ``a``, indexed from its first key ``sh_lo``), each renormalised
    over the shared keys ``sh_lo .. sh_hi-1``."""
    m = sh_hi - sh_lo
    m4 = m - m % 4
    e0, e1, e2, e3, l0, l1, l2, l3 = _shared_sums(e_row, sh_lo, p, m4)
    for j in range(m4, m):
        e0 += e_row[sh_lo + j]
        l0 += p[j]
    te = (e0 + e1) + (e2 + e3)
    tl = (l0 + l1) + (l2 + l3)
    if te >= TINY_MASS and tl >= TINY_MASS:
        ratio = te / tl
        c0, c1, c2, c3 = _distance_sums(e_row, sh_lo, p, ratio, m4)
        for j in range(m4, m):
            x0 = e_row[sh_lo + j] - p[j] * ratio
            c0 += x0 * x0
        return math.sqrt((c0 + c1) + (c2 + c3)) / te
    # every shared key far below a row's maximum: a softmax over the shared keys' scores
    me, ml = e_a[sh_lo], a[0]
    for j in range(m):
        me = max(me, e_a[sh_lo + j])
        ml = max(ml, a[j])
    ze = zl = 0.0
    for j in range(m):
        ze += math.exp(e_a[sh_lo + j] - me)
        zl += math.exp(a[j] - ml)
    acc = 0.0
    for j in range(m):
        x0 = math.exp(e_a[sh_lo + j] - me) / ze - math.exp(a[j] - ml) / zl
        acc += x0 * x0
    return math.sqrt(acc)
