// NIXL backend "TCPX": a thin C++ face over the Rust engine (tcpx_nixl.h).
// No logic lives here: each virtual translates NIXL's C++ types to the C API
// and back. No exception leaves this file (NIXL's callers do not expect any),
// and none reaches the Rust frames that call the sinks below.
#include "nixl_abi.h"
#include "tcpx_nixl.h"

#include <cstdio>
#include <exception>
#include <memory>
#include <new>

namespace {

const char kName[] = "TCPX";
const char kVersion[] = "0.1.0";

void logErr(const char *what, int rc) {
    std::fprintf(stderr, "nixl TCPX: %s failed (status %d): %s\n", what, rc, tnx_last_error());
}

nixl_status_t status(const char *what, int rc) {
    if (rc < 0) logErr(what, rc);
    return static_cast<nixl_status_t>(rc);
}

// What tnx_supported_mems reports (CUDA is probed once, in Rust).
nixl_mem_list_t supportedMems() noexcept {
    try {
        uint32_t kinds[8];
        const size_t n = tnx_supported_mems(kinds, 8);
        nixl_mem_list_t out;
        for (size_t i = 0; i < n && i < 8; ++i) out.push_back(static_cast<nixl_mem_t>(kinds[i]));
        return out;
    } catch (...) {
        return {};
    }
}

// Sinks called from Rust: an exception must not unwind through its frames,
// so every one is caught and reported as a non-zero return.
extern "C" int appendTo(void *ctx, const uint8_t *data, size_t len) noexcept {
    try {
        static_cast<std::string *>(ctx)->append(reinterpret_cast<const char *>(data), len);
        return 0;
    } catch (...) {
        return 1;
    }
}

extern "C" int appendNotif(void *ctx, const uint8_t *agent, size_t alen, const uint8_t *msg,
                           size_t mlen) noexcept {
    try {
        static_cast<notif_list_t *>(ctx)->emplace_back(
            std::string(reinterpret_cast<const char *>(agent), alen),
            std::string(reinterpret_cast<const char *>(msg), mlen));
        return 0;
    } catch (...) {
        return 1;
    }
}

// A registration (local) or a loaded remote descriptor, by Rust-side id.
class TcpxMD : public nixlBackendMD {
public:
    TcpxMD(bool is_private, uint64_t id) : nixlBackendMD(is_private), id(id) {}
    uint64_t id;
};

class TcpxReqH : public nixlBackendReqH {
public:
    ~TcpxReqH() override {
        tnx_xfer_free(xfer);
        tnx_prep_free(prep);
    }
    tnx_prep *prep = nullptr;
    tnx_xfer *xfer = nullptr;
};

uint64_t mdId(const nixlBackendMD *md) {
    return md ? static_cast<const TcpxMD *>(md)->id : 0;
}

class TcpxEngine : public nixlBackendEngine {
public:
    explicit TcpxEngine(const nixlBackendInitParams *p) : nixlBackendEngine(p) {
        std::vector<const char *> keys, vals;
        for (const auto &kv : getCustomParams()) {
            keys.push_back(kv.first.c_str());
            vals.push_back(kv.second.c_str());
        }
        int rc = tnx_engine_new(localAgent.c_str(), keys.data(), vals.data(), keys.size(),
                                p->enableProgTh ? 1 : 0, p->pthrDelay, &e_);
        if (rc != 0) {
            logErr("creating the engine", rc);
            initErr = true;
        }
    }
    ~TcpxEngine() override { tnx_engine_free(e_); }

    bool supportsRemote() const override { return true; }
    bool supportsLocal() const override { return false; }
    bool supportsNotif() const override { return true; }
    nixl_mem_list_t getSupportedMems() const override { return supportedMems(); }

    nixl_status_t registerMem(const nixlBlobDesc &mem, const nixl_mem_t &kind,
                              nixlBackendMD *&out) override try {
        uint64_t id = 0;
        int rc = tnx_register(e_, mem.addr, mem.len, static_cast<uint32_t>(kind), &id);
        if (rc != 0) return status("registerMem", rc);
        out = new TcpxMD(true, id);
        return NIXL_SUCCESS;
    } catch (...) {
        return NIXL_ERR_UNKNOWN;
    }

    nixl_status_t deregisterMem(nixlBackendMD *meta) override {
        int rc = tnx_deregister(e_, mdId(meta));
        delete meta;
        return status("deregisterMem", rc);
    }

    nixl_status_t connect(const std::string &agent) override {
        return status("connect", tnx_connect(e_, agent.c_str()));
    }
    nixl_status_t disconnect(const std::string &agent) override {
        return status("disconnect", tnx_disconnect(e_, agent.c_str()));
    }

    nixl_status_t unloadMD(nixlBackendMD *input) override {
        int rc = tnx_unload_remote_md(e_, mdId(input));
        delete input;
        return status("unloadMD", rc);
    }

    // The descriptors are resolved here, once for every post of the handle.
    nixl_status_t prepXfer(const nixl_xfer_op_t &op, const nixl_meta_dlist_t &local,
                           const nixl_meta_dlist_t &remote, const std::string &agent,
                           nixlBackendReqH *&handle, const nixl_opt_b_args_t *) const override try {
        if (op != NIXL_READ && op != NIXL_WRITE) return NIXL_ERR_INVALID_PARAM;
        const int n = local.descCount();
        if (n != remote.descCount()) return NIXL_ERR_MISMATCH;
        int rc = tnx_check_xfer_mems(static_cast<uint32_t>(local.getType()),
                                     static_cast<uint32_t>(remote.getType()));
        if (rc != 0) return status("prepXfer", rc);
        std::vector<tnx_desc> ds(static_cast<size_t>(n));
        for (int i = 0; i < n; ++i) {
            const nixlMetaDesc &l = local[i];
            const nixlMetaDesc &r = remote[i];
            if (l.len != r.len) return NIXL_ERR_MISMATCH;
            ds[i] = tnx_desc{l.addr, r.addr, l.len, mdId(l.metadataP), mdId(r.metadataP)};
        }
        auto h = std::make_unique<TcpxReqH>();
        rc = tnx_xfer_prep(e_, op == NIXL_WRITE ? 1 : 0, agent.c_str(), ds.data(), ds.size(),
                           &h->prep);
        if (rc != 0) return status("prepXfer", rc);
        handle = h.release();
        return NIXL_SUCCESS;
    } catch (...) {
        return NIXL_ERR_UNKNOWN;
    }

    // NIXL posts a handle with the lists it was prepared with.
    nixl_status_t postXfer(const nixl_xfer_op_t &, const nixl_meta_dlist_t &,
                           const nixl_meta_dlist_t &, const std::string &,
                           nixlBackendReqH *&handle,
                           const nixl_opt_b_args_t *opt) const override try {
        auto *h = static_cast<TcpxReqH *>(handle);
        if (!h || !h->prep) return NIXL_ERR_INVALID_PARAM;
        const bool has = opt && opt->hasNotif;
        const std::string *msg = has ? &opt->notifMsg : nullptr;
        tnx_xfer_free(h->xfer);  // a repost replaces the finished transfer
        h->xfer = nullptr;
        int rc = tnx_xfer_post(e_, h->prep,
                               has ? reinterpret_cast<const uint8_t *>(msg->data()) : nullptr,
                               has ? msg->size() : 0, has ? 1 : 0, &h->xfer);
        return status("postXfer", rc);
    } catch (...) {
        return NIXL_ERR_UNKNOWN;
    }

    nixl_status_t checkXfer(nixlBackendReqH *handle) const override {
        auto *h = static_cast<TcpxReqH *>(handle);
        if (!h || !h->xfer) return NIXL_ERR_NOT_POSTED;
        return status("transfer", tnx_xfer_check(h->xfer));
    }

    nixl_status_t releaseReqH(nixlBackendReqH *handle) const override {
        delete handle;
        return NIXL_SUCCESS;
    }

    nixl_status_t getPublicData(const nixlBackendMD *meta, std::string &str) const override try {
        str.clear();
        return status("getPublicData", tnx_public_data(e_, mdId(meta), appendTo, &str));
    } catch (...) {
        return NIXL_ERR_UNKNOWN;
    }

    nixl_status_t getConnInfo(std::string &str) const override try {
        str.clear();
        return status("getConnInfo", tnx_conn_info(e_, appendTo, &str));
    } catch (...) {
        return NIXL_ERR_UNKNOWN;
    }

    nixl_status_t loadRemoteConnInfo(const std::string &agent, const std::string &info) override {
        return status("loadRemoteConnInfo",
                      tnx_load_conn_info(e_, agent.c_str(),
                                         reinterpret_cast<const uint8_t *>(info.data()),
                                         info.size()));
    }

    nixl_status_t loadRemoteMD(const nixlBlobDesc &input, const nixl_mem_t &kind,
                               const std::string &agent, nixlBackendMD *&out) override try {
        uint64_t id = 0;
        int rc = tnx_load_remote_md(e_, agent.c_str(),
                                    reinterpret_cast<const uint8_t *>(input.metaInfo.data()),
                                    input.metaInfo.size(), static_cast<uint32_t>(kind), &id);
        if (rc != 0) return status("loadRemoteMD", rc);
        out = new TcpxMD(false, id);
        return NIXL_SUCCESS;
    } catch (...) {
        return NIXL_ERR_UNKNOWN;
    }

    nixl_status_t getNotifs(notif_list_t &list) override try {
        return status("getNotifs", tnx_get_notifs(e_, appendNotif, &list));
    } catch (...) {
        return NIXL_ERR_UNKNOWN;
    }

    nixl_status_t genNotif(const std::string &agent, const std::string &msg) const override {
        return status("genNotif",
                      tnx_gen_notif(e_, agent.c_str(),
                                    reinterpret_cast<const uint8_t *>(msg.data()), msg.size()));
    }

private:
    tnx_engine *e_ = nullptr;
};

nixlBackendEngine *createEngine(const nixlBackendInitParams *p) {
    try {
        return new TcpxEngine(p);
    } catch (...) {
        return nullptr;
    }
}

void destroyEngine(nixlBackendEngine *e) { delete e; }
const char *pluginName() { return kName; }
const char *pluginVersion() { return kVersion; }

nixl_b_params_t backendOptions() noexcept {
    try {
        nixl_b_params_t out;
        const char *k = nullptr;
        const char *d = nullptr;
        for (size_t i = 0; tnx_option(i, &k, &d); ++i) out.emplace(k, d);
        return out;
    } catch (...) {
        return {};
    }
}

nixl_mem_list_t backendMems() { return supportedMems(); }

}  // namespace

// Called from the Rust-exported nixl_plugin_init (src/ffi.rs).
extern "C" void *tcpx_nixl_plugin_descriptor() {
    static nixlBackendPlugin plugin = {NIXL_PLUGIN_API_VERSION, createEngine, destroyEngine,
                                       pluginName, pluginVersion, backendOptions, backendMems};
    return &plugin;
}
