"""ctypes bindings of libqkv: the structures of include/qkv.h, the library
search, per-thread contexts and the status-to-exception mapping."""
import ctypes
import ctypes.util
import os
import threading

P = ctypes.POINTER

F32, F16, BF16 = 0, 1, 2


class Tensor(ctypes.Structure):
    """qkv_tensor: a non-owning 4-d view, strides in elements."""
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int),
                ("shape", ctypes.c_int64 * 4), ("stride", ctypes.c_int64 * 4)]


class Opts(ctypes.Structure):
    """qkv_attn_opts."""
    _fields_ = [("scale", ctypes.c_float), ("causal", ctypes.c_int),
                ("window_left", ctypes.c_int64), ("window_right", ctypes.c_int64),
                ("softcap", ctypes.c_float),
                ("alibi_slopes", P(ctypes.c_float)), ("bias", P(Tensor)),
                ("cu_seqlens_q", P(ctypes.c_int32)), ("cu_seqlens_k", P(ctypes.c_int32)),
                ("n_seqs", ctypes.c_int32),
                ("dropout_p", ctypes.c_float), ("dropout_seed", ctypes.c_uint64)]


class Error(RuntimeError):
    """A call into libqkv failed. `status` is the library's status code,
    `status_name` its name, and the message names the argument at fault."""

    def __init__(self, status, status_name, message):
        super().__init__(f"{status_name}: {message}" if message else status_name)
        self.status, self.status_name, self.message = status, status_name, message


def _candidates():
    env = os.environ.get("QKV_LIBRARY")
    if env:
        yield env
        return
    here = os.path.dirname(os.path.abspath(__file__))
    yield os.path.join(here, "libqkv.so")
    # an in-tree checkout: python/qkv/ beside build/
    yield os.path.join(here, "..", "..", "build", "libqkv.so")
    found = ctypes.util.find_library("qkv")
    if found:
        yield found


def _load():
    tried = []
    for path in _candidates():
        if not os.path.sep in path or os.path.exists(path):
            try:
                return ctypes.CDLL(path)   # CDLL: the GIL is released during calls
            except OSError as e:
                tried.append(f"{path}: {e}")
        else:
            tried.append(f"{path}: not found")
    raise ImportError("qkv: cannot find libqkv (set QKV_LIBRARY to its path, or build it "
                      "with `make` in the repository); tried " + "; ".join(tried))


lib = _load()

_T = P(Tensor)
_SIGS = {
    "qkv_version": ([], ctypes.c_char_p),
    "qkv_alloc": ([ctypes.c_size_t], ctypes.c_void_p),
    "qkv_free": ([ctypes.c_void_p], None),
    "qkv_status_string": ([ctypes.c_int], ctypes.c_char_p),
    "qkv_ctx_create": ([ctypes.c_int], ctypes.c_void_p),
    "qkv_ctx_free": ([ctypes.c_void_p], None),
    "qkv_ctx_last_error": ([ctypes.c_void_p], ctypes.c_char_p),
    "qkv_ctx_threads": ([ctypes.c_void_p], ctypes.c_int),
    "qkv_ctx_isa": ([ctypes.c_void_p], ctypes.c_char_p),
    "qkv_ctx_set_isa": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int),
    "qkv_isa_name": ([ctypes.c_int], ctypes.c_char_p),
    "qkv_isa_supported": ([ctypes.c_char_p], ctypes.c_int),
    "qkv_attn_opts_default": ([], Opts),
    "qkv_attention_forward": ([ctypes.c_void_p, _T, _T, _T, P(Opts), _T, P(ctypes.c_float)],
                              ctypes.c_int),
    "qkv_attention_reference": ([ctypes.c_void_p, _T, _T, _T, P(Opts), _T, P(ctypes.c_float)],
                                ctypes.c_int),
    "qkv_attention_backward": ([ctypes.c_void_p, _T, _T, _T, _T, _T, P(ctypes.c_float),
                                P(Opts), _T, _T, _T], ctypes.c_int),
    "qkv_attention_backward_reference": ([ctypes.c_void_p, _T, _T, _T, _T, _T,
                                          P(ctypes.c_float), P(Opts), _T, _T, _T],
                                         ctypes.c_int),
    "qkv_attention_backward_dbias": ([ctypes.c_void_p, _T, _T, _T, _T, _T, P(ctypes.c_float),
                                      P(Opts), _T, _T, _T, _T], ctypes.c_int),
}
def bind(sigs):
    """Sets the argument and result types of the library's functions named
    in sigs ({name: ([argtypes], restype)})."""
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


bind(_SIGS)

_d = lib.qkv_attn_opts_default()
if (_d.window_left, _d.window_right, _d.scale, _d.n_seqs, _d.dropout_p, _d.dropout_seed) != \
        (-1, -1, 0.0, 0, 0.0, 0):
    raise ImportError("qkv: the library's qkv_attn_opts does not match these bindings")


class _Ctx:
    """An owned qkv_ctx, freed with the object."""

    def __init__(self, threads):
        self.ptr = lib.qkv_ctx_create(threads)
        if not self.ptr:
            raise Error(-9, "thread", f"qkv_ctx_create({threads}) failed")

    def __del__(self):
        if getattr(self, "ptr", None):
            lib.qkv_ctx_free(self.ptr)
            self.ptr = None


_local = threading.local()


def context(threads=None):
    """The calling thread's context for `threads` workers (None or 0: one
    per core). A qkv_ctx serves one calling thread at a time, so each
    Python thread keeps its own."""
    n = int(threads or 0)
    if n < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    cache = getattr(_local, "ctxs", None)
    if cache is None:
        cache = _local.ctxs = {}
    ctx = cache.get(n)
    if ctx is None:
        ctx = cache[n] = _Ctx(n)
    return ctx.ptr


def check(status, ctx):
    """Raises Error for a failed call, with the context's message."""
    if status != 0:
        raise Error(status, lib.qkv_status_string(status).decode(),
                    lib.qkv_ctx_last_error(ctx).decode())
