"""Tractography, written once as plain Python functions and compiled for CPU and CUDA.

Nothing here is compiled at import time: :func:`kernels.compile.compile_for` turns every function
named in :data:`DEVICE_FUNCTIONS` into a ``numba.njit`` (CPU) or ``numba.cuda.jit(device=True)``
(CUDA) function, with the calls between them bound to the same target, and the thin drivers at the
end into the CPU's parallel loops (:data:`CPU_KERNELS`) or CUDA kernels (:data:`CUDA_KERNELS`): each
driver only hands one item (a seed, a half streamline, a streamline) to the same device functions.
The code therefore uses only what both targets support: scalars, array indexing, ``math``, and
numpy scalar casts.

**Specialisation.** The globals below marked *build constants* are read by compiled code as
compile-time constants, and ``compile_for(constants=...)`` replaces them per build:
``SPEC_ALGORITHM``/``SPEC_ODF_MODE``/``SPEC_STOP`` fix the algorithm, ODF evaluation and stopping
rule (-1: read from ``ip`` at run time, the CPU's one generic build), so a CUDA build holds only the
code of the run it serves; ``LOCAL_*`` size the CUDA kernels' per-thread arrays to that run's need;
``REAL`` is the floating-point type of the tracking arithmetic (float64 on the CPU, float32 in
CUDA builds).  Every float literal of the arithmetic is written ``REAL(...)`` so that it does not
promote float32 to float64, and transcendental functions are evaluated in float64 on a float64
argument computed from the float32 values, then rounded (an argument that is only a widened
float32 would let LLVM shrink ``(float) sin((double) x)`` to ``sinf(x)``, which the simulator's
Python does not do; and Numba's ``float(x)`` keeps a float32 a float32: widen with
``np.float64``), so that a build gives the same bits on the CPU and under the CUDA simulator,
and the same up to fused multiply-adds and libdevice's last bits on a GPU.

Geometry: points are voxel indices (voxel centres at integers); directions are unit vectors in the
image's scaled-voxel-axis frame (the frame of the SH coefficients); a step of ``step_size`` mm moves
by ``d * step_size / voxel_size`` voxels on each axis; output points are world (RAS+) mm via the affine.

Randomness: a counter-based generator (SplitMix64 finaliser) keyed on (run seed, seed index) and
counted by (stream = 2*peak + half, draw = 4*step + k): a streamline never depends on which thread,
chunk, GPU or backend computed it (a build of the other precision draws from the same bits,
rounded to 24 instead of 53 of them).

Parameters reach the kernels as two small vectors, ``fp`` (REAL) and ``ip`` (int64), filled by
:func:`kernels.engine.pack_params` and read here through the named slots below (``fp[F_STEP_SIZE]``);
both sides use the same names, so no slot number is written anywhere else.

The ODF is a table with one row per voxel that has one (the mask): ``vidx`` (X, Y, Z) int32 gives
each voxel's row, 0 for none (row 0 of every table is zero).  With ``ODF_SF`` the rows of ``sf``
(R, Vp) int16 hold the ODF sampled on the hemisphere's vertices, ``oscale[r]`` being the value of
one unit of row r (so the trilinear weights absorb the scales); with ``ODF_SH`` the rows of ``shc``
(R, K) float32 hold SH coefficients (scales 1).  The vertices follow a Hilbert curve over the
sphere (:func:`kernels.sphere.locality_order`), so one cone's vertices share few memory sectors.

``nbrs`` (V, D + C): columns 0..D-1 (D = ``ip[I_NBR_DEGREE]``) list each vertex's sphere neighbours, columns D..
list the vertices that can lie inside the max-angle cone of any direction whose nearest vertex is
this one (the cone plus the sphere's covering radius); both padded with -1.

Bootstrap arrays: ``bdata`` (X, Y, Z, nd + 1) holds the diffusion-weighted volumes then the mean
b=0; ``bootm`` (2 nd + 2 K, nd) stacks the hat matrix H, the leverage-corrected residual matrix,
and the model matrices (CSA: log(-log E) -> SH; OPDT: delta_b then delta_q).

Work decomposition.  On the CPU one loop iteration tracks every streamline of one seed
(:func:`track_seed`).  On CUDA a first kernel finds each seed's peaks (:func:`seed_directions`),
then persistent threads pull *half streamlines* (seed, peak, direction) from an atomic counter
(:func:`track_task`), so no thread idles while another finishes a long streamline; the halves
are joined afterwards (:func:`join_halves`), with the result the sequential order would give.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

cuda = None   # the CUDA drivers' ``cuda`` module: bound by kernels.compile for the CUDA target

# streamline end states
TRACK = 0
END = 1        # stopped on the stopping criterion (point kept for ACT/CMC, dropped for threshold)
OUTSIDE = 2    # left the image; the point is dropped
INVALID = 3    # ACT/CMC: entered an excluded tissue; the streamline is rejected
NODIR = 4      # no direction inside the cone
MAXLEN = 5     # ran out of points (max length)

ALGO_PROB, ALGO_DET, ALGO_PTT, ALGO_BOOT = 0, 1, 2, 3
STOP_THRESHOLD, STOP_ACT, STOP_CMC = 0, 1, 2
ODF_SF, ODF_SH = 0, 1          # ODF pre-sampled on the sphere, or SH coefficients evaluated on the fly
BOOT_CSA, BOOT_OPDT = 0, 1

# ``fp`` slots (REAL)
F_STEP_SIZE = 0               # step size (mm)
F_COS_MAX_ANGLE = 1           # cos(max angle between steps)
F_PMF_THRESHOLD = 2           # PMF values below this fraction of the ODF maximum are ignored
F_STOP_THRESHOLD = 3          # threshold stopping: keep tracking while the stop map is above it
F_REL_PEAK_THRESHOLD = 4      # ODF peaks below this fraction of the maximum are ignored
F_COS_MIN_SEPARATION = 5      # cos(min angle between two seed peaks)
F_VOXEL_X = 6                 # voxel sizes (mm) along the three voxel axes
F_VOXEL_Y = 7
F_VOXEL_Z = 8
F_CMC_SCALE = 9               # CMC probability scale: step size / mean voxel size
F_PTT_PROBE_LENGTH = 10       # PTT probe length (mm)
F_PTT_MAX_CURVATURE = 11      # PTT max curvature (1/mm): max angle per step / step size
N_FLOAT_PARAMS = 16

# ``ip`` slots (int64)
I_ALGORITHM = 0               # ALGO_*
I_ODF_MODE = 1                # ODF_SF or ODF_SH
I_STOP_METHOD = 2             # STOP_*
I_MAX_POINTS = 3              # points per streamline (both halves and the seed)
I_MAX_CROSS = 4               # streamlines (ODF peaks) per seed
I_N_VERTS = 5                 # sphere (hemisphere) vertices
I_N_ODF_COEF = 6              # SH coefficients in ``shc`` (ODF_SH), 0 with ODF_SF
I_NBR_DEGREE = 7              # neighbour columns of ``nbrs`` (the cone candidates follow)
I_RNG_SEED = 8                # run seed of the counter-based generator
I_PTT_PROBE_POINTS = 9
I_PTT_MAX_TRIES = 10
I_BOOT_N_DWI = 11             # diffusion-weighted volumes of the bootstrap shell
I_BOOT_MAX_TRIES = 12
I_N_SH_COEF = 13              # columns of ``bmat`` (SH coefficients of the series)
I_BOOT_MODEL = 14             # BOOT_CSA or BOOT_OPDT
I_MAX_CHANNEL = 15            # channel of ``stop`` holding the per-voxel ODF maximum
N_INT_PARAMS = 16

WORK_HEAD = 16                # work[0:16]: PTT frame; the bootstrap's vectors follow

# ---- build constants (see the module docstring); these values make the CPU's generic build
SPEC_ALGORITHM = -1           # ALGO_* of the build, -1: ip[I_ALGORITHM] at run time
SPEC_ODF_MODE = -1            # ODF_SF / ODF_SH, -1: ip[I_ODF_MODE]
SPEC_STOP = -1                # STOP_*, -1: ip[I_STOP_METHOD]
REAL = np.float64             # arithmetic type
RAND_SHIFT = np.uint64(11)    # uniform_real(): the top 64 - RAND_SHIFT bits of a draw ...
RAND_SCALE = np.float64(1.0 / 9007199254740992.0)   # ... times 2**-(64 - RAND_SHIFT)
LOCAL_PMF = 1                 # CUDA per-thread arrays: PMF / cone CDF (float32)
LOCAL_COEF = 1                # SH coefficients (REAL)
LOCAL_WORK = 1                # PTT frame, bootstrap vectors (REAL)

_GOLD = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_S32 = np.uint64(32)
_INV53 = 1.0 / 9007199254740992.0
SEED_STREAM = 1 << 22      # stream id used for seed placement
SEEDCHECK_STREAM = 1 << 21  # stream id used for the CMC draw at the seed


def precision_constants(dtype) -> dict:
    """The build constants of one arithmetic precision (``np.float32`` or ``np.float64``)."""
    if np.dtype(dtype) == np.float32:
        return {"REAL": np.float32, "RAND_SHIFT": np.uint64(40), "RAND_SCALE": np.float32(2.0 ** -24)}
    return {"REAL": np.float64, "RAND_SHIFT": np.uint64(11), "RAND_SCALE": np.float64(2.0 ** -53)}


# ----------------------------------------------------------------------------- settings
def algorithm_of(ip):
    if SPEC_ALGORITHM >= 0:
        return SPEC_ALGORITHM
    return ip[I_ALGORITHM]


def odf_mode_of(ip):
    if SPEC_ODF_MODE >= 0:
        return SPEC_ODF_MODE
    return ip[I_ODF_MODE]


def stop_method_of(ip):
    if SPEC_STOP >= 0:
        return SPEC_STOP
    return ip[I_STOP_METHOD]


# ----------------------------------------------------------------------------- random numbers
def splitmix64(x):
    z = x + _GOLD
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def stream_key(run_seed, seed_index):
    """Key of one seed's random stream (both int64 >= 0)."""
    return splitmix64(splitmix64(np.uint64(seed_index)) ^ splitmix64(np.uint64(run_seed) + _MIX1))


def uniform(key, stream, draw):
    """Uniform double in [0, 1) for (key, stream, draw)."""
    c = (np.uint64(stream) << _S32) ^ np.uint64(draw)
    x = splitmix64(key ^ splitmix64(c))
    return float(x >> _S11) * _INV53


def uniform_real(key, stream, draw):
    """The same draw as :func:`uniform` as a REAL in [0, 1) (float32: its top 24 bits, exactly)."""
    c = (np.uint64(stream) << _S32) ^ np.uint64(draw)
    x = splitmix64(key ^ splitmix64(c))
    return REAL(x >> RAND_SHIFT) * RAND_SCALE


# ----------------------------------------------------------------------------- interpolation
def cell(x, y, z, nx, ny, nz):
    """Trilinear cell of voxel-index point (x, y, z); ok=False outside [-0.5, n-0.5]."""
    if x < REAL(-0.5) or y < REAL(-0.5) or z < REAL(-0.5) or x > REAL(nx) - REAL(0.5) \
            or y > REAL(ny) - REAL(0.5) or z > REAL(nz) - REAL(0.5):
        return False, 0, 0, 0, 0, 0, 0, REAL(0.0), REAL(0.0), REAL(0.0)
    fx0 = math.floor(x)
    fy0 = math.floor(y)
    fz0 = math.floor(z)
    fx = x - REAL(fx0)
    fy = y - REAL(fy0)
    fz = z - REAL(fz0)
    i0 = int(fx0)
    j0 = int(fy0)
    k0 = int(fz0)
    i1 = i0 + 1
    j1 = j0 + 1
    k1 = k0 + 1
    if i0 < 0:
        i0 = 0
    if j0 < 0:
        j0 = 0
    if k0 < 0:
        k0 = 0
    if i1 > nx - 1:
        i1 = nx - 1
    if j1 > ny - 1:
        j1 = ny - 1
    if k1 > nz - 1:
        k1 = nz - 1
    return True, i0, j0, k0, i1, j1, k1, fx, fy, fz


def interp_at(vol, c, i0, j0, k0, i1, j1, k1, fx, fy, fz):
    """Trilinear interpolation of channel c of a 4D volume."""
    gx = REAL(1.0) - fx
    gy = REAL(1.0) - fy
    gz = REAL(1.0) - fz
    a = (vol[i0, j0, k0, c] * gx + vol[i1, j0, k0, c] * fx) * gy \
        + (vol[i0, j1, k0, c] * gx + vol[i1, j1, k0, c] * fx) * fy
    b = (vol[i0, j0, k1, c] * gx + vol[i1, j0, k1, c] * fx) * gy \
        + (vol[i0, j1, k1, c] * gx + vol[i1, j1, k1, c] * fx) * fy
    return a * gz + b * fz


def cell_rows(vidx, scale, x, y, z):
    """The trilinear cell of (x, y, z) in the ODF table: the table rows of its 8 corners
    (``vidx`` of each corner voxel) and their weights (trilinear weight times the row's scale)."""
    ok, i0, j0, k0, i1, j1, k1, fx, fy, fz = cell(x, y, z, vidx.shape[0], vidx.shape[1], vidx.shape[2])
    if not ok:
        zero = REAL(0.0)
        return False, 0, 0, 0, 0, 0, 0, 0, 0, zero, zero, zero, zero, zero, zero, zero, zero
    r0 = vidx[i0, j0, k0]
    r1 = vidx[i1, j0, k0]
    r2 = vidx[i0, j1, k0]
    r3 = vidx[i1, j1, k0]
    r4 = vidx[i0, j0, k1]
    r5 = vidx[i1, j0, k1]
    r6 = vidx[i0, j1, k1]
    r7 = vidx[i1, j1, k1]
    gx = REAL(1.0) - fx
    gy = REAL(1.0) - fy
    gz = REAL(1.0) - fz
    return (True, r0, r1, r2, r3, r4, r5, r6, r7,
            gx * gy * gz * scale[r0], fx * gy * gz * scale[r1],
            gx * fy * gz * scale[r2], fx * fy * gz * scale[r3],
            gx * gy * fz * scale[r4], fx * gy * fz * scale[r5],
            gx * fy * fz * scale[r6], fx * fy * fz * scale[r7])


def table_at(tab, c, r0, r1, r2, r3, r4, r5, r6, r7, w0, w1, w2, w3, w4, w5, w6, w7):
    """Column c of the ODF table interpolated at a cell (see :func:`cell_rows`)."""
    return (w0 * tab[r0, c] + w1 * tab[r1, c] + w2 * tab[r2, c] + w3 * tab[r3, c]
            + w4 * tab[r4, c] + w5 * tab[r5, c] + w6 * tab[r6, c] + w7 * tab[r7, c])


def eval_pmf(vidx, sf, shc, oscale, bmat, mode, nverts, ncoef, x, y, z, coef, pmf):
    """ODF at (x, y, z) on the sphere into ``pmf`` (negatives zeroed); returns its max, -1 outside."""
    ok, r0, r1, r2, r3, r4, r5, r6, r7, w0, w1, w2, w3, w4, w5, w6, w7 = cell_rows(vidx, oscale, x, y, z)
    if not ok:
        return REAL(-1.0)
    mx = REAL(0.0)
    if mode == ODF_SF:
        for v in range(nverts):
            s = table_at(sf, v, r0, r1, r2, r3, r4, r5, r6, r7, w0, w1, w2, w3, w4, w5, w6, w7)
            if s < REAL(0.0):
                s = REAL(0.0)
            pmf[v] = s
            if s > mx:
                mx = s
        return mx
    for c in range(ncoef):
        coef[c] = table_at(shc, c, r0, r1, r2, r3, r4, r5, r6, r7, w0, w1, w2, w3, w4, w5, w6, w7)
    for v in range(nverts):
        s = REAL(0.0)
        for c in range(ncoef):
            s += bmat[v, c] * coef[c]
        if s < REAL(0.0):
            s = REAL(0.0)
        pmf[v] = s
        if s > mx:
            mx = s
    return mx


# ----------------------------------------------------------------------------- direction getters
def prob_cone(vidx, sf, shc, oscale, bmat, mode, ncoef, stop, maxch, x, y, z, verts, nbrs, maxdeg,
              u_vert, dx, dy, dz, cos_max, pmf_thr, u, coef, pmf):
    """Probabilistic direction using only the vertices listed in the cone table of ``u_vert``
    (the vertex nearest the previous direction).  The PMF threshold is relative to the ODF
    maximum interpolated from the per-voxel maximum map (channel ``maxch`` of ``stop``)."""
    zero = REAL(0.0)
    ok, i0, j0, k0, i1, j1, k1, fx, fy, fz = cell(x, y, z, stop.shape[0], stop.shape[1], stop.shape[2])
    if not ok:
        return False, zero, zero, zero
    mx = interp_at(stop, maxch, i0, j0, k0, i1, j1, k1, fx, fy, fz)
    if mx <= zero:
        return False, zero, zero, zero
    thr = pmf_thr * mx
    ok, r0, r1, r2, r3, r4, r5, r6, r7, w0, w1, w2, w3, w4, w5, w6, w7 = cell_rows(vidx, oscale, x, y, z)
    if mode != ODF_SF:
        for c in range(ncoef):
            coef[c] = table_at(shc, c, r0, r1, r2, r3, r4, r5, r6, r7, w0, w1, w2, w3, w4, w5, w6, w7)
    total = zero
    last = -1
    width = nbrs.shape[1]
    m = 0
    for q in range(maxdeg, width):
        w = nbrs[u_vert, q]
        if w < 0:
            break
        c = verts[w, 0] * dx + verts[w, 1] * dy + verts[w, 2] * dz
        if c < zero:
            c = -c
        if c >= cos_max:
            if mode == ODF_SF:
                p = table_at(sf, w, r0, r1, r2, r3, r4, r5, r6, r7, w0, w1, w2, w3, w4, w5, w6, w7)
            else:
                p = zero
                for cc in range(ncoef):
                    p += bmat[w, cc] * coef[cc]
            if p > zero and p >= thr:
                total += p
                last = m
        pmf[m] = total
        m += 1
    if last < 0:
        return False, zero, zero, zero
    target = u * total
    sel = last
    for q in range(m):
        if pmf[q] > target:
            sel = q
            break
    w = nbrs[u_vert, maxdeg + sel]
    ox = verts[w, 0]
    oy = verts[w, 1]
    oz = verts[w, 2]
    if ox * dx + oy * dy + oz * dz < zero:
        ox = -ox
        oy = -oy
        oz = -oz
    return True, ox, oy, oz


def is_local_max(pmf, v, nbrs, maxdeg):
    p = pmf[v]
    for q in range(maxdeg):
        w = nbrs[v, q]
        if w < 0:
            break
        if pmf[w] > p:
            return False
    return True


def closest_peak(pmf, nverts, verts, nbrs, maxdeg, dx, dy, dz, cos_max, rel_thr, mx):
    """The ODF peak closest to (dx, dy, dz), if within the cone."""
    zero = REAL(0.0)
    thr = rel_thr * mx
    best = REAL(-1.0)
    sel = -1
    for v in range(nverts):
        p = pmf[v]
        if p <= zero or p < thr:
            continue
        c = verts[v, 0] * dx + verts[v, 1] * dy + verts[v, 2] * dz
        if c < zero:
            c = -c
        if c <= best:
            continue
        if not is_local_max(pmf, v, nbrs, maxdeg):
            continue
        best = c
        sel = v
    if sel < 0 or best < cos_max:
        return False, zero, zero, zero
    ox = verts[sel, 0]
    oy = verts[sel, 1]
    oz = verts[sel, 2]
    if ox * dx + oy * dy + oz * dz < zero:
        ox = -ox
        oy = -oy
        oz = -oz
    return True, ox, oy, oz


def seed_peaks(pmf, nverts, verts, nbrs, maxdeg, rel_thr, cos_sep, mx, max_peaks, peaks):
    """Up to ``max_peaks`` ODF peaks (largest first, separated by > min angle) into ``peaks``."""
    thr = rel_thr * mx
    n = 0
    for k in range(max_peaks):
        best = REAL(-1.0)
        sel = -1
        for v in range(nverts):
            p = pmf[v]
            if p <= REAL(0.0) or p < thr or p <= best:
                continue
            if not is_local_max(pmf, v, nbrs, maxdeg):
                continue
            far = True
            for j in range(n):
                w = peaks[j]
                c = verts[v, 0] * verts[w, 0] + verts[v, 1] * verts[w, 1] + verts[v, 2] * verts[w, 2]
                if c < REAL(0.0):
                    c = -c
                if c > cos_sep:
                    far = False
                    break
            if not far:
                continue
            best = REAL(p)
            sel = v
        if sel < 0:
            break
        peaks[n] = sel
        n += 1
    return n


def odf_value(vidx, sf, shc, oscale, bmat, mode, ncoef, x, y, z, v):
    """ODF amplitude at (x, y, z) on sphere vertex v; -1 outside the image."""
    ok, r0, r1, r2, r3, r4, r5, r6, r7, w0, w1, w2, w3, w4, w5, w6, w7 = cell_rows(vidx, oscale, x, y, z)
    if not ok:
        return REAL(-1.0)
    if mode == ODF_SF:
        return table_at(sf, v, r0, r1, r2, r3, r4, r5, r6, r7, w0, w1, w2, w3, w4, w5, w6, w7)
    s = REAL(0.0)
    for c in range(ncoef):
        s += bmat[v, c] * table_at(shc, c, r0, r1, r2, r3, r4, r5, r6, r7, w0, w1, w2, w3, w4, w5, w6, w7)
    return s


def nearest_vertex(verts, nbrs, maxdeg, v, tx, ty, tz):
    """Vertex closest to +-(tx, ty, tz), by hill climbing on the sphere graph from vertex v."""
    best = verts[v, 0] * tx + verts[v, 1] * ty + verts[v, 2] * tz
    if best < REAL(0.0):
        best = -best
    moved = True
    while moved:
        moved = False
        for q in range(maxdeg):
            w = nbrs[v, q]
            if w < 0:
                break
            c = verts[w, 0] * tx + verts[w, 1] * ty + verts[w, 2] * tz
            if c < REAL(0.0):
                c = -c
            if c > best:
                best = c
                v = w
                moved = True
                break
    return v


def arc_point(l, k1, k2, work):
    """Offset (mm) and tangent after arc length l with curvature (k1, k2) in frame work[0:9]."""
    k = REAL(math.sqrt(k1 * k1 + k2 * k2))
    tx = work[0]
    ty = work[1]
    tz = work[2]
    if k < REAL(1e-9):
        return l * tx, l * ty, l * tz, tx, ty, tz
    nx = (k1 * work[3] + k2 * work[6]) / k
    ny = (k1 * work[4] + k2 * work[7]) / k
    nz = (k1 * work[5] + k2 * work[8]) / k
    kl = np.float64(k) * np.float64(l)     # float64, see the module docstring
    sn = REAL(math.sin(kl))
    cs = REAL(math.cos(kl))
    a = sn / k
    b = (REAL(1.0) - cs) / k
    return (a * tx + b * nx, a * ty + b * ny, a * tz + b * nz,
            cs * tx + sn * nx, cs * ty + sn * ny, cs * tz + sn * nz)


def frame_init(dx, dy, dz, work):
    """Tangent (dx, dy, dz) and two unit normals into work[0:9]."""
    ax = REAL(1.0)
    ay = REAL(0.0)
    az = REAL(0.0)
    if abs(dx) > REAL(0.8):
        ax = REAL(0.0)
        ay = REAL(1.0)
    n1x = dy * az - dz * ay
    n1y = dz * ax - dx * az
    n1z = dx * ay - dy * ax
    nn = REAL(math.sqrt(n1x * n1x + n1y * n1y + n1z * n1z))
    n1x /= nn
    n1y /= nn
    n1z /= nn
    work[0] = dx
    work[1] = dy
    work[2] = dz
    work[3] = n1x
    work[4] = n1y
    work[5] = n1z
    work[6] = dy * n1z - dz * n1y
    work[7] = dz * n1x - dx * n1z
    work[8] = dx * n1y - dy * n1x


def frame_advance(l, k1, k2, work):
    """Parallel-transport the frame work[0:9] along an arc of length l."""
    k = REAL(math.sqrt(k1 * k1 + k2 * k2))
    if k < REAL(1e-9):
        return
    tx = work[0]
    ty = work[1]
    tz = work[2]
    nx = (k1 * work[3] + k2 * work[6]) / k
    ny = (k1 * work[4] + k2 * work[7]) / k
    nz = (k1 * work[5] + k2 * work[8]) / k
    bx = ty * nz - tz * ny
    by = tz * nx - tx * nz
    bz = tx * ny - ty * nx
    kl = np.float64(k) * np.float64(l)     # float64, see the module docstring
    sn = REAL(math.sin(kl))
    cs = REAL(math.cos(kl))
    n2x = -sn * tx + cs * nx
    n2y = -sn * ty + cs * ny
    n2z = -sn * tz + cs * nz
    work[0] = cs * tx + sn * nx
    work[1] = cs * ty + sn * ny
    work[2] = cs * tz + sn * nz
    for o in range(3, 9, 3):
        a = work[o] * nx + work[o + 1] * ny + work[o + 2] * nz
        b = work[o] * bx + work[o + 1] * by + work[o + 2] * bz
        work[o] = a * n2x + b * bx
        work[o + 1] = a * n2y + b * by
        work[o + 2] = a * n2z + b * bz


def ptt_step(x, y, z, v, vidx, sf, shc, oscale, bmat, verts, nbrs, fp, ip, key, stream, s, work, mx):
    """Parallel transport tractography: draw a curvature on the disc, probe the arc ahead for
    ODF support, accept by rejection sampling; move one step along the accepted arc.

    Returns (ok, x, y, z, v); the frame in work[0:9] is transported.
    """
    step_size = fp[F_STEP_SIZE]
    kmax = fp[F_PTT_MAX_CURVATURE]
    probe = fp[F_PTT_PROBE_LENGTH]
    nq = ip[I_PTT_PROBE_POINTS]
    mode = odf_mode_of(ip)
    floor = fp[F_PMF_THRESHOLD] * mx
    for t in range(ip[I_PTT_MAX_TRIES]):
        base = 1024 * s + 4 * t
        r = kmax * REAL(math.sqrt(uniform_real(key, stream, base)))
        phi = 2.0 * math.pi * np.float64(uniform_real(key, stream, base + 1))
        k1 = r * REAL(math.cos(phi))
        k2 = r * REAL(math.sin(phi))
        support = REAL(0.0)
        good = True
        vv = v
        for q in range(1, nq + 1):
            l = probe * REAL(q) / REAL(nq)
            ox, oy, oz, tx, ty, tz = arc_point(l, k1, k2, work)
            vv = nearest_vertex(verts, nbrs, ip[I_NBR_DEGREE], vv, tx, ty, tz)
            val = odf_value(vidx, sf, shc, oscale, bmat, mode, ip[I_N_ODF_COEF], x + ox / fp[F_VOXEL_X],
                            y + oy / fp[F_VOXEL_Y], z + oz / fp[F_VOXEL_Z], vv)
            if val < floor or val <= REAL(0.0):
                good = False
                break
            support += val
        if not good:
            continue
        if uniform_real(key, stream, base + 2) * mx <= support / REAL(nq):
            ox, oy, oz, tx, ty, tz = arc_point(step_size, k1, k2, work)
            frame_advance(step_size, k1, k2, work)
            v = nearest_vertex(verts, nbrs, ip[I_NBR_DEGREE], v, work[0], work[1], work[2])
            return True, x + ox / fp[F_VOXEL_X], y + oy / fp[F_VOXEL_Y], z + oz / fp[F_VOXEL_Z], v
    return False, x, y, z, v


def boot_direction(bdata, bootm, bmat, verts, nbrs, fp, ip, x, y, z, dx, dy, dz,
                   key, stream, draw0, work, coef, pmf):
    """Residual bootstrap: resample the leverage-corrected residuals of an SH fit of the signal,
    refit the CSA/OPDT ODF, take the peak closest to (dx, dy, dz) inside the cone."""
    zero = REAL(0.0)
    nd = ip[I_BOOT_N_DWI]
    ncb = ip[I_N_SH_COEF]
    nverts = ip[I_N_VERTS]
    ok, i0, j0, k0, i1, j1, k1, fx, fy, fz = cell(x, y, z, bdata.shape[0], bdata.shape[1],
                                                 bdata.shape[2])
    if not ok:
        return False, zero, zero, zero
    s0 = interp_at(bdata, nd, i0, j0, k0, i1, j1, k1, fx, fy, fz)
    if s0 <= zero:
        return False, zero, zero, zero
    e0 = WORK_HEAD
    f0 = WORK_HEAD + nd
    r0 = WORK_HEAD + 2 * nd
    for i in range(nd):
        e = interp_at(bdata, i, i0, j0, k0, i1, j1, k1, fx, fy, fz) / s0
        if e < REAL(1e-5):
            e = REAL(1e-5)
        work[e0 + i] = e
    for i in range(nd):
        fit = zero
        res = zero
        for j in range(nd):
            fit += bootm[i, j] * work[e0 + j]
            res += bootm[nd + i, j] * work[e0 + j]
        work[f0 + i] = fit
        work[r0 + i] = res
    for t in range(ip[I_BOOT_MAX_TRIES]):
        for c in range(ncb):
            coef[c] = zero
        for i in range(nd):
            j = int(uniform(key, stream, draw0 + t * nd + i) * nd)
            if j >= nd:
                j = nd - 1
            e = work[f0 + i] + work[r0 + j]
            if e < REAL(0.001):
                e = REAL(0.001)
            if e > REAL(0.999):
                e = REAL(0.999)
            if ip[I_BOOT_MODEL] == BOOT_CSA:
                a = REAL(math.log(-math.log(np.float64(e))))
                for c in range(ncb):
                    coef[c] += bootm[2 * nd + c, i] * a
            else:
                ld = -math.log(np.float64(e))
                a = REAL(ld * (1.5 - ld) * np.float64(e))
                for c in range(ncb):
                    coef[c] += bootm[2 * nd + ncb + c, i] * a - bootm[2 * nd + c, i] * e
        if ip[I_BOOT_MODEL] == BOOT_CSA:
            coef[0] = REAL(0.28209479177387814)  # 1 / (2 sqrt(pi)): CSA's normalised ODF
        mx = zero
        for v in range(nverts):
            s = zero
            for c in range(ncb):
                s += bmat[v, c] * coef[c]
            if s < zero:
                s = zero
            pmf[v] = s
            if s > mx:
                mx = s
        if mx <= zero:
            continue
        ok, ox, oy, oz = closest_peak(pmf, nverts, verts, nbrs, ip[I_NBR_DEGREE], dx, dy, dz,
                                      fp[F_COS_MAX_ANGLE], fp[F_REL_PEAK_THRESHOLD], mx)
        if ok:
            return True, ox, oy, oz
    return False, zero, zero, zero


# ----------------------------------------------------------------------------- stopping
def stop_status(stop, method, thr, cmc_scale, x, y, z, key, stream, draw):
    """State of point (x, y, z) for the stopping criterion (TRACK, END, OUTSIDE, INVALID)."""
    ok, i0, j0, k0, i1, j1, k1, fx, fy, fz = cell(x, y, z, stop.shape[0], stop.shape[1], stop.shape[2])
    if not ok:
        return OUTSIDE
    if method == STOP_THRESHOLD:
        v = interp_at(stop, 0, i0, j0, k0, i1, j1, k1, fx, fy, fz)
        if v > thr:
            return TRACK
        return END
    inc = interp_at(stop, 0, i0, j0, k0, i1, j1, k1, fx, fy, fz)
    exc = interp_at(stop, 1, i0, j0, k0, i1, j1, k1, fx, fy, fz)
    if method == STOP_ACT:
        if inc > REAL(0.5):
            return END
        if exc > REAL(0.5):
            return INVALID
        return TRACK
    if inc > REAL(0.99):
        return END
    if exc > REAL(0.99):
        return INVALID
    u = uniform_real(key, stream, draw)
    if u < exc * cmc_scale:
        return INVALID
    if u < (exc + inc) * cmc_scale:
        return END
    return TRACK


def end_ok(method, status):
    """Is this end state acceptable?  ACT/CMC accept only ends in an include region or outside."""
    if status == INVALID:
        return False
    if method == STOP_THRESHOLD:
        return True
    return status == END or status == OUTSIDE


def join_halves(n_b, st_b, n_f, st_f, budget_f, method):
    """Join a backward half of ``n_b`` points (seed included) and a forward half that had
    ``budget_f`` points left: (forward points kept, whether the streamline is accepted).

    The forward half may have been tracked with a larger budget (CUDA tracks both halves at
    once): its first ``budget_f`` points are those of the shorter run, which ends there with
    MAXLEN unless its last point itself ended it (ACT/CMC keep the point that stops them).
    """
    written_end = st_f == INVALID or (st_f == END and method != STOP_THRESHOLD)
    if n_f > budget_f or (n_f == budget_f and not written_end):
        n_f = budget_f
        st_f = MAXLEN
    return n_f, end_ok(method, st_b) and end_ok(method, st_f)


# ----------------------------------------------------------------------------- propagation
def write_world(out, slot, n, aff, x, y, z):
    out[slot, n, 0] = aff[0, 0] * x + aff[0, 1] * y + aff[0, 2] * z + aff[0, 3]
    out[slot, n, 1] = aff[1, 0] * x + aff[1, 1] * y + aff[1, 2] * z + aff[1, 3]
    out[slot, n, 2] = aff[2, 0] * x + aff[2, 1] * y + aff[2, 2] * z + aff[2, 3]


def track_half(x, y, z, dx, dy, dz, n, budget, out, slot, key, stream,
               vidx, sf, shc, oscale, bmat, verts, nbrs, stop, aff, fp, ip, bdata, bootm, pmf,
               coef, work):
    """Follow one direction from (x, y, z), appending up to ``budget`` world points to out[slot].

    Returns (number of points now in out[slot], end state).
    """
    step_size = fp[F_STEP_SIZE]
    sx = step_size / fp[F_VOXEL_X]
    sy = step_size / fp[F_VOXEL_Y]
    sz = step_size / fp[F_VOXEL_Z]
    algo = algorithm_of(ip)
    mode = odf_mode_of(ip)
    method = stop_method_of(ip)
    status = MAXLEN
    v = nearest_vertex(verts, nbrs, ip[I_NBR_DEGREE], 0, dx, dy, dz)
    if algo == ALGO_PTT:
        frame_init(dx, dy, dz, work)
    for s in range(budget):
        if algo == ALGO_BOOT:
            ok, ndx, ndy, ndz = boot_direction(bdata, bootm, bmat, verts, nbrs, fp, ip, x, y, z,
                                               dx, dy, dz, key, stream + 128, 4096 * s, work,
                                               coef, pmf)
            if not ok:
                status = NODIR
                break
            dx = ndx
            dy = ndy
            dz = ndz
            x += dx * sx
            y += dy * sy
            z += dz * sz
        elif algo == ALGO_PTT:
            ok, i0, j0, k0, i1, j1, k1, fx, fy, fz = cell(x, y, z, stop.shape[0], stop.shape[1],
                                                         stop.shape[2])
            mx = interp_at(stop, ip[I_MAX_CHANNEL], i0, j0, k0, i1, j1, k1, fx, fy, fz)
            if mx <= REAL(0.0):
                status = NODIR
                break
            ok, x, y, z, v = ptt_step(x, y, z, v, vidx, sf, shc, oscale, bmat, verts, nbrs, fp, ip, key,
                                      stream + 64, s, work, mx)
            if not ok:
                status = NODIR
                break
        else:
            if algo == ALGO_DET:
                mx = eval_pmf(vidx, sf, shc, oscale, bmat, mode, ip[I_N_VERTS], ip[I_N_ODF_COEF],
                              x, y, z, coef, pmf)
                if mx <= REAL(0.0):
                    status = NODIR
                    break
                ok, ndx, ndy, ndz = closest_peak(pmf, ip[I_N_VERTS], verts, nbrs, ip[I_NBR_DEGREE], dx, dy, dz,
                                                 fp[F_COS_MAX_ANGLE], fp[F_REL_PEAK_THRESHOLD], mx)
            else:
                v = nearest_vertex(verts, nbrs, ip[I_NBR_DEGREE], v, dx, dy, dz)
                u = uniform_real(key, stream, 4 * s)
                ok, ndx, ndy, ndz = prob_cone(vidx, sf, shc, oscale, bmat, mode, ip[I_N_ODF_COEF], stop,
                                              ip[I_MAX_CHANNEL], x, y, z, verts, nbrs, ip[I_NBR_DEGREE], v,
                                              dx, dy, dz, fp[F_COS_MAX_ANGLE], fp[F_PMF_THRESHOLD], u,
                                              coef, pmf)
            if not ok:
                status = NODIR
                break
            dx = ndx
            dy = ndy
            dz = ndz
            x += dx * sx
            y += dy * sy
            z += dz * sz
        st = stop_status(stop, method, fp[F_STOP_THRESHOLD], fp[F_CMC_SCALE], x, y, z, key, stream, 4 * s + 1)
        if st == OUTSIDE or (st == END and method == STOP_THRESHOLD):
            # a point that left the image or failed the threshold is not kept; ACT/CMC keep
            # the point that reached the include region
            status = st
            break
        write_world(out, slot, n, aff, x, y, z)
        n += 1
        if st != TRACK:
            status = st
            break
    return n, status


def seed_directions(seed_index, sx, sy, sz, vidx, sf, shc, oscale, bmat, verts, nbrs, stop, fp, ip,
                    pmf, coef, peaks):
    """The ODF peaks at a seed (vertex numbers into ``peaks``, largest first): how many, 0 when
    the seed is not tracked (stopping criterion, or no ODF)."""
    key = stream_key(ip[I_RNG_SEED], seed_index)
    if stop_status(stop, stop_method_of(ip), fp[F_STOP_THRESHOLD], fp[F_CMC_SCALE], sx, sy, sz, key,
                   SEEDCHECK_STREAM, 0) != TRACK:
        return 0
    mx = eval_pmf(vidx, sf, shc, oscale, bmat, odf_mode_of(ip), ip[I_N_VERTS], ip[I_N_ODF_COEF], sx, sy,
                  sz, coef, pmf)
    if mx <= REAL(0.0):
        return 0
    return seed_peaks(pmf, ip[I_N_VERTS], verts, nbrs, ip[I_NBR_DEGREE], fp[F_REL_PEAK_THRESHOLD],
                      fp[F_COS_MIN_SEPARATION], mx, ip[I_MAX_CROSS], peaks)


def track_seed(i, seed_index, sx, sy, sz, vidx, sf, shc, oscale, bmat, verts, nbrs, stop, aff, fp, ip,
               bdata, bootm, out, out_n, pmf, coef, peaks, work):
    """All streamlines of one seed (one per ODF peak, up to ip[I_MAX_CROSS]) into slots
    i*ip[I_MAX_CROSS] + k: backward half, reversed, then forward half."""
    max_cross = ip[I_MAX_CROSS]
    max_pts = ip[I_MAX_POINTS]
    method = stop_method_of(ip)
    for k in range(max_cross):
        out_n[i * max_cross + k] = 0
    npk = seed_directions(seed_index, sx, sy, sz, vidx, sf, shc, oscale, bmat, verts, nbrs, stop, fp,
                          ip, pmf, coef, peaks)
    key = stream_key(ip[I_RNG_SEED], seed_index)
    for k in range(npk):
        slot = i * max_cross + k
        v = peaks[k]
        px = verts[v, 0]
        py = verts[v, 1]
        pz = verts[v, 2]
        write_world(out, slot, 0, aff, sx, sy, sz)
        n_b, st_b = track_half(sx, sy, sz, -px, -py, -pz, 1, max_pts - 1, out, slot, key, 2 * k,
                               vidx, sf, shc, oscale, bmat, verts, nbrs, stop, aff, fp, ip, bdata,
                               bootm, pmf, coef, work)
        for j in range(n_b // 2):
            t = n_b - 1 - j
            for c in range(3):
                tmp = out[slot, j, c]
                out[slot, j, c] = out[slot, t, c]
                out[slot, t, c] = tmp
        n, st_f = track_half(sx, sy, sz, px, py, pz, n_b, max_pts - n_b, out, slot, key, 2 * k + 1,
                             vidx, sf, shc, oscale, bmat, verts, nbrs, stop, aff, fp, ip, bdata,
                             bootm, pmf, coef, work)
        n_f, ok = join_halves(n_b, st_b, n - n_b, st_f, max_pts - n_b, method)
        if ok:
            out_n[slot] = n_b + n_f


def track_task(t, first_index, seeds, peaks, npk, vidx, sf, shc, oscale, bmat, verts, nbrs, stop,
               aff, fp, ip, bdata, bootm, out, out_n, out_st, pmf, coef, work):
    """Half streamline ``t`` of a chunk: seed t // (2 max_cross), peak (t // 2) % max_cross,
    backward (t even: the seed point first) or forward (t odd), into out[t]; its point count
    and end state into out_n[t], out_st[t] (0 points: no such peak)."""
    max_cross = ip[I_MAX_CROSS]
    i = t // (2 * max_cross)
    k = (t // 2) % max_cross
    half = t % 2
    out_n[t] = 0
    out_st[t] = MAXLEN
    if k >= npk[i]:
        return
    sx = seeds[i, 0]
    sy = seeds[i, 1]
    sz = seeds[i, 2]
    v = peaks[i, k]
    px = verts[v, 0]
    py = verts[v, 1]
    pz = verts[v, 2]
    n = 0
    if half == 0:
        px = -px
        py = -py
        pz = -pz
        write_world(out, t, 0, aff, sx, sy, sz)
        n = 1
    key = stream_key(ip[I_RNG_SEED], first_index + i)
    n, st = track_half(sx, sy, sz, px, py, pz, n, ip[I_MAX_POINTS] - 1, out, t, key, 2 * k + half,
                       vidx, sf, shc, oscale, bmat, verts, nbrs, stop, aff, fp, ip, bdata, bootm, pmf,
                       coef, work)
    out_n[t] = n
    out_st[t] = st


def join_slot(s, out_n, out_st, ip, lengths):
    """Points of streamline slot s once its two halves (tasks 2s, 2s + 1) are joined; 0 if none
    or rejected."""
    n_b = out_n[2 * s]
    lengths[s] = 0
    if n_b == 0:
        return
    n_f, ok = join_halves(n_b, out_st[2 * s], out_n[2 * s + 1], out_st[2 * s + 1],
                          ip[I_MAX_POINTS] - n_b, stop_method_of(ip))
    if ok:
        lengths[s] = n_b + n_f


def copy_streamline(j, out, slots, offsets, lengths, positions):
    """Copy the points of kept slot ``slots[j]`` to ``positions[offsets[j]:]`` (TRX layout)."""
    s = slots[j]
    o = offsets[j]
    for t in range(lengths[j]):
        positions[o + t, 0] = out[s, t, 0]
        positions[o + t, 1] = out[s, t, 1]
        positions[o + t, 2] = out[s, t, 2]


def copy_joined(j, out, out_n, slots, offsets, lengths, positions):
    """Like :func:`copy_streamline` from two halves: out[2s] reversed (it ends at the seed),
    then the first points of out[2s + 1]."""
    s = slots[j]
    o = offsets[j]
    n_b = out_n[2 * s]
    for t in range(n_b):
        for c in range(3):
            positions[o + t, c] = out[2 * s, n_b - 1 - t, c]
    for t in range(lengths[j] - n_b):
        for c in range(3):
            positions[o + n_b + t, c] = out[2 * s + 1, t, c]


def place_seed(i, first_index, vox, per_voxel, run_seed, out):
    """Position (voxel indices) of global seed ``first_index + i`` into ``out[i]``.

    ``per_voxel > 0``: seed g lies in voxel ``vox[g // per_voxel]``; otherwise in a voxel drawn at
    random.  Each seed is jittered uniformly inside its voxel.
    """
    nvox = vox.shape[0]
    g = first_index + i
    key = stream_key(run_seed, g)
    if per_voxel > 0:
        v = g // per_voxel
    else:
        v = int(uniform(key, SEED_STREAM, 3) * nvox)
        if v >= nvox:
            v = nvox - 1
    out[i, 0] = vox[v, 0] + uniform(key, SEED_STREAM, 0) - 0.5
    out[i, 1] = vox[v, 1] + uniform(key, SEED_STREAM, 1) - 0.5
    out[i, 2] = vox[v, 2] + uniform(key, SEED_STREAM, 2) - 0.5


# ----------------------------------------------------------------------------- drivers
# Each driver hands one item to the device functions above: a prange loop on the CPU (scratch
# arrays sized to need at run time), one thread per item on CUDA (scratch arrays of the
# build's LOCAL_* sizes).

def track_chunk_cpu(seeds, first_index, vidx, sf, shc, oscale, bmat, verts, nbrs, stop, aff, fp, ip,
                    bdata, bootm, out, out_n):
    nv = ip[I_N_VERTS]
    nc = max(max(ip[I_N_ODF_COEF], ip[I_N_SH_COEF]), 1)
    mc = ip[I_MAX_CROSS]
    nw = WORK_HEAD + 3 * ip[I_BOOT_N_DWI]
    for i in prange(seeds.shape[0]):
        pmf = np.empty(nv, np.float32)
        coef = np.empty(nc, REAL)
        peaks = np.empty(mc, np.int32)
        work = np.empty(nw, REAL)
        track_seed(i, first_index + i, seeds[i, 0], seeds[i, 1], seeds[i, 2], vidx, sf, shc, oscale,
                   bmat, verts, nbrs, stop, aff, fp, ip, bdata, bootm, out, out_n, pmf, coef, peaks,
                   work)


def seed_directions_cuda(seeds, first_index, vidx, sf, shc, oscale, bmat, verts, nbrs, stop, fp, ip,
                         peaks, npk):
    i = cuda.grid(1)
    if i < seeds.shape[0]:
        pmf = cuda.local.array(LOCAL_PMF, np.float32)
        coef = cuda.local.array(LOCAL_COEF, REAL)
        npk[i] = seed_directions(first_index + i, seeds[i, 0], seeds[i, 1], seeds[i, 2], vidx, sf, shc,
                                 oscale, bmat, verts, nbrs, stop, fp, ip, pmf, coef, peaks[i])


def track_tasks_cuda(seeds, first_index, peaks, npk, vidx, sf, shc, oscale, bmat, verts, nbrs, stop,
                     aff, fp, ip, bdata, bootm, out, out_n, out_st, counter):
    """Persistent threads: each takes the next half streamline from ``counter`` until none is left."""
    pmf = cuda.local.array(LOCAL_PMF, np.float32)
    coef = cuda.local.array(LOCAL_COEF, REAL)
    work = cuda.local.array(LOCAL_WORK, REAL)
    n_tasks = out_n.shape[0]
    t = cuda.atomic.add(counter, 0, 1)
    while t < n_tasks:
        track_task(t, first_index, seeds, peaks, npk, vidx, sf, shc, oscale, bmat, verts, nbrs, stop,
                   aff, fp, ip, bdata, bootm, out, out_n, out_st, pmf, coef, work)
        t = cuda.atomic.add(counter, 0, 1)


def join_slots_cuda(out_n, out_st, ip, lengths):
    s = cuda.grid(1)
    if s < lengths.shape[0]:
        join_slot(s, out_n, out_st, ip, lengths)


def place_seeds_cpu(first_index, count, vox, per_voxel, run_seed, out):
    for i in prange(count):
        place_seed(i, first_index, vox, per_voxel, run_seed, out)


def gather_points_cpu(out, slots, offsets, lengths, positions):
    for j in prange(slots.shape[0]):
        copy_streamline(j, out, slots, offsets, lengths, positions)


def gather_joined_cpu(out, out_n, slots, offsets, lengths, positions):
    for j in prange(slots.shape[0]):
        copy_joined(j, out, out_n, slots, offsets, lengths, positions)


def gather_joined_cuda(out, out_n, slots, offsets, lengths, positions):
    j = cuda.grid(1)
    if j < slots.shape[0]:
        copy_joined(j, out, out_n, slots, offsets, lengths, positions)


DEVICE_FUNCTIONS = (
    algorithm_of, odf_mode_of, stop_method_of, splitmix64, stream_key, uniform, uniform_real, cell,
    interp_at, cell_rows, table_at, eval_pmf, is_local_max, closest_peak, seed_peaks, prob_cone,
    odf_value, nearest_vertex, arc_point, frame_init, frame_advance, ptt_step, boot_direction,
    stop_status, end_ok, join_halves, write_world, track_half, seed_directions, track_seed, track_task,
    join_slot, copy_streamline, copy_joined, place_seed,
)
CPU_KERNELS = (track_chunk_cpu, place_seeds_cpu, gather_points_cpu)
CUDA_KERNELS = (seed_directions_cuda, track_tasks_cuda, join_slots_cuda, gather_joined_cuda)
