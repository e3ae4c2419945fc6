// The C API of the Rust layer (src/ffi.rs), called by plugin.cpp.
// Every function returns a nixl_status_t value; on failure tnx_last_error()
// says why (valid until the next call on the same thread). Strings are
// NUL-terminated UTF-8; byte buffers are (pointer, length).
#ifndef TCPX_NIXL_H
#define TCPX_NIXL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tnx_engine tnx_engine;
typedef struct tnx_xfer tnx_xfer;
typedef struct tnx_prep tnx_prep;

typedef struct tnx_desc {
    uint64_t local_addr;
    uint64_t remote_addr;
    uint64_t len;
    uint64_t local_md;   // id from tnx_register
    uint64_t remote_md;  // id from tnx_load_remote_md
} tnx_desc;

// Sinks return 0 when they took the bytes, non-zero when they could not
// (out of memory); they must not throw.
typedef int (*tnx_sink_fn)(void *ctx, const uint8_t *data, size_t len);
typedef int (*tnx_notif_fn)(void *ctx, const uint8_t *agent, size_t agent_len,
                            const uint8_t *msg, size_t msg_len);

const char *tnx_last_error(void);
// keys/vals: n option pairs. progress_thread != 0: one thread polls the
// peers, pausing progress_delay_us between rounds (NIXL's enableProgTh and
// pthrDelay); 0: threads sleep on the sockets. *out is set on success; free
// with tnx_engine_free.
int tnx_engine_new(const char *agent, const char *const *keys, const char *const *vals,
                   size_t n, int progress_thread, uint64_t progress_delay_us,
                   tnx_engine **out);
void tnx_engine_free(tnx_engine *e);
int tnx_conn_info(const tnx_engine *e, tnx_sink_fn sink, void *ctx);
int tnx_load_conn_info(const tnx_engine *e, const char *agent, const uint8_t *info, size_t len);
// The memory must stay valid until tnx_deregister and until transfers using it complete.
int tnx_register(const tnx_engine *e, uint64_t addr, uint64_t len, uint32_t mem, uint64_t *out_id);
int tnx_deregister(const tnx_engine *e, uint64_t id);
int tnx_public_data(const tnx_engine *e, uint64_t id, tnx_sink_fn sink, void *ctx);
int tnx_load_remote_md(const tnx_engine *e, const char *agent, const uint8_t *blob, size_t len,
                       uint32_t mem, uint64_t *out_id);
int tnx_unload_remote_md(const tnx_engine *e, uint64_t id);
int tnx_connect(const tnx_engine *e, const char *agent);
int tnx_disconnect(const tnx_engine *e, const char *agent);
// Writes the nixl_mem_t kinds usable in this process into out[0..cap]; returns their count.
size_t tnx_supported_mems(uint32_t *out, size_t cap);
// NIXL_SUCCESS when a transfer between these nixl_mem_t kinds can be prepared here.
int tnx_check_xfer_mems(uint32_t local, uint32_t remote);
// op: 0 READ, 1 WRITE. Merges, resolves and checks the descriptors once;
// *out is set on success; free with tnx_prep_free (posts in flight go on).
int tnx_xfer_prep(const tnx_engine *e, int op, const char *agent, const tnx_desc *descs, size_t n,
                  tnx_prep **out);
void tnx_prep_free(tnx_prep *p);
// Posts a prepared transfer (again, once the last post finished). Returns
// NIXL_IN_PROG/NIXL_SUCCESS with *out set, or an error.
int tnx_xfer_post(const tnx_engine *e, const tnx_prep *p, const uint8_t *notif, size_t notif_len,
                  int has_notif, tnx_xfer **out);
int tnx_xfer_check(const tnx_xfer *x);
void tnx_xfer_free(tnx_xfer *x);
// Hands each queued notification to sink once; one the sink refuses stays
// queued (with those after it) and the call fails.
int tnx_get_notifs(const tnx_engine *e, tnx_notif_fn sink, void *ctx);
int tnx_gen_notif(const tnx_engine *e, const char *agent, const uint8_t *msg, size_t len);
// Option i's key and default; returns 0 past the last option.
int tnx_option(size_t i, const char **key, const char **default_value);

#ifdef __cplusplus
}
#endif
#endif
