/* Loads the plugin the way NCCL does (dlopen + dlsym of ncclNetPlugin_vN)
 * and drives host-memory transfers through each table's entries only.
 * Usage: net_plugin <path to libnccl-net-tcpx.so>. Prints "nccl-plugin: ok". */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nccl_net_decls.h"

#define CHECK(c)                                                             \
  do {                                                                       \
    if (!(c)) {                                                              \
      fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #c);           \
      dump_log();                                                            \
      exit(1);                                                               \
    }                                                                        \
  } while (0)
#define OK(x) CHECK((x) == ncclSuccess)

/* ------------------------------------------------------------ the logger */
#define MAX_LINES 4096
static char log_lines[MAX_LINES][512];
static int log_level[MAX_LINES];
static unsigned long log_flags[MAX_LINES];
static int n_lines;

static void logger(ncclDebugLogLevel level, unsigned long flags, const char* file, int line,
                   const char* fmt, ...) {
  (void)file;
  (void)line;
  if (n_lines >= MAX_LINES) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(log_lines[n_lines], sizeof log_lines[0], fmt, ap);
  va_end(ap);
  log_level[n_lines] = (int)level;
  log_flags[n_lines] = flags;
  n_lines++;
}

static void dump_log(void) {
  for (int i = 0; i < n_lines; i++) fprintf(stderr, "  log[%d] %s\n", log_level[i], log_lines[i]);
}

/* Index of the first line at or after `from` containing `needle` at `level`, or -1. */
static int find_log(int from, int level, const char* needle) {
  for (int i = from; i < n_lines; i++)
    if (log_level[i] == level && strstr(log_lines[i], needle)) return i;
  return -1;
}

/* Whether the plugin offers CUDA pointers (TCPX_NCCL_GDR=1 and CUDA here). */
static int gdr;

/* ------------------------------------------------- one shape for all versions */
struct ops {
  const char* ver;
  ncclResult_t (*listen)(int dev, void* handle, void** l);
  ncclResult_t (*connect)(int dev, void* handle, void** s);
  ncclResult_t (*accept)(void* l, void** r);
  ncclResult_t (*regMr)(void* comm, void* data, size_t size, int type, void** mh);
  ncclResult_t (*regMrDmaBuf)(void* comm, void* data, size_t size, int type, uint64_t offset,
                              int fd, void** mh);
  ncclResult_t (*deregMr)(void* comm, void* mh);
  ncclResult_t (*isend)(void* s, void* data, size_t size, int tag, void* mh, void** req);
  ncclResult_t (*irecv)(void* r, int n, void** data, size_t* sizes, int* tags, void** mhs,
                        void** req);
  ncclResult_t (*iflush)(void* r, int n, void** data, int* sizes, void** mhs, void** req);
  ncclResult_t (*test)(void* req, int* done, int* sizes);
  ncclResult_t (*closeSend)(void* c);
  ncclResult_t (*closeRecv)(void* c);
  ncclResult_t (*closeListen)(void* c);
};

static ncclNet_v8_t* n8;
static ncclNet_v9_t* n9;
static ncclNet_v10_t* n10;
static ncclNet_v11_t* n11;
static ncclNet_v12_t* n12;
static void* ctx11;
static void* ctx12;
static ncclNetCommConfig_t cfg10 = {-1};

static ncclResult_t l8(int d, void* h, void** l) { return n8->listen(d, h, l); }
static ncclResult_t l9(int d, void* h, void** l) { return n9->listen(d, h, l); }
static ncclResult_t l10(int d, void* h, void** l) { return n10->listen(d, h, l); }
static ncclResult_t l11(int d, void* h, void** l) { return n11->listen(ctx11, d, h, l); }
static ncclResult_t l12(int d, void* h, void** l) { return n12->listen(ctx12, d, h, l); }

static devh_t devh; /* NCCL passes a pointer to its device-handle slot */
static ncclResult_t c8(int d, void* h, void** s) { return n8->connect(d, h, s, &devh); }
static ncclResult_t c9(int d, void* h, void** s) { return n9->connect(d, h, s, &devh); }
static ncclResult_t c10(int d, void* h, void** s) { return n10->connect(d, &cfg10, h, s, &devh); }
static ncclResult_t c11(int d, void* h, void** s) { return n11->connect(ctx11, d, h, s, &devh); }
static ncclResult_t c12(int d, void* h, void** s) { return n12->connect(ctx12, d, h, s, &devh); }

static ncclResult_t a8(void* l, void** r) { return n8->accept(l, r, &devh); }
static ncclResult_t a9(void* l, void** r) { return n9->accept(l, r, &devh); }
static ncclResult_t a10(void* l, void** r) { return n10->accept(l, r, &devh); }
static ncclResult_t a11(void* l, void** r) { return n11->accept(l, r, &devh); }
static ncclResult_t a12(void* l, void** r) { return n12->accept(l, r, &devh); }

/* v8 takes int sizes. */
static ncclResult_t s8(void* s, void* d, size_t n, int tag, void* mh, void** req) {
  return n8->isend(s, d, (int)n, tag, mh, req);
}
static ncclResult_t r8(void* r, int n, void** d, size_t* sizes, int* tags, void** mhs, void** req) {
  int isz[8];
  for (int i = 0; i < n; i++) isz[i] = (int)sizes[i];
  return n8->irecv(r, n, d, isz, tags, mhs, req);
}
static ncclResult_t s9(void* s, void* d, size_t n, int tag, void* mh, void** req) {
  return n9->isend(s, d, n, tag, mh, req);
}
static ncclResult_t r9(void* r, int n, void** d, size_t* sizes, int* tags, void** mhs, void** req) {
  return n9->irecv(r, n, d, sizes, tags, mhs, req);
}
static int phandle; /* any non-NULL profiler handle */
static ncclResult_t s10(void* s, void* d, size_t n, int tag, void* mh, void** req) {
  return n10->isend(s, d, n, tag, mh, &phandle, req);
}
static ncclResult_t r10(void* r, int n, void** d, size_t* sizes, int* tags, void** mhs, void** req) {
  void* ph[8] = {0};
  return n10->irecv(r, n, d, sizes, tags, mhs, ph, req);
}
static ncclResult_t s11(void* s, void* d, size_t n, int tag, void* mh, void** req) {
  return n11->isend(s, d, n, tag, mh, &phandle, req);
}
static ncclResult_t r11(void* r, int n, void** d, size_t* sizes, int* tags, void** mhs, void** req) {
  void* ph[8] = {0};
  return n11->irecv(r, n, d, sizes, tags, mhs, ph, req);
}
static ncclResult_t s12(void* s, void* d, size_t n, int tag, void* mh, void** req) {
  return n12->isend(s, d, n, tag, mh, &phandle, req);
}
static ncclResult_t r12(void* r, int n, void** d, size_t* sizes, int* tags, void** mhs, void** req) {
  void* ph[8] = {0};
  return n12->irecv(r, n, d, sizes, tags, mhs, ph, req);
}

#define COMMON(t)                                                                              \
  .regMr = (t)->regMr, .regMrDmaBuf = (t)->regMrDmaBuf, .deregMr = (t)->deregMr,               \
  .iflush = (t)->iflush, .test = (t)->test, .closeSend = (t)->closeSend,                       \
  .closeRecv = (t)->closeRecv, .closeListen = (t)->closeListen

/* Required entries are non-NULL; the optional ones we leave NULL are NULL. */
#define CHECK_TABLE(t)                                                                         \
  do {                                                                                         \
    CHECK(t != NULL);                                                                          \
    CHECK(t->name != NULL && strcmp(t->name, "TCPX-rs") == 0);                                 \
    CHECK(t->init && t->devices && t->getProperties && t->listen && t->connect && t->accept);  \
    CHECK(t->regMr && t->regMrDmaBuf && t->deregMr && t->isend && t->irecv && t->iflush);      \
    CHECK(t->test && t->closeSend && t->closeRecv && t->closeListen);                          \
    CHECK(t->getDeviceMr == NULL && t->irecvConsumed == NULL);                                 \
  } while (0)

/* ------------------------------------------------------------- transfers */
static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint8_t next_byte(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (uint8_t)(rng >> 24);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* test() until done; returns the sizes (n of them). */
static void wait_req(const struct ops* o, void* req, int* sizes) {
  double deadline = now() + 10;
  int done = 0;
  while (!done) {
    OK(o->test(req, &done, sizes));
    CHECK(now() < deadline);
  }
}

#define BUF (4u << 20)

static void transfer(const struct ops* o, int dev) {
  char handle[NCCL_NET_HANDLE_MAXSIZE] = {0};
  void *lc = NULL, *sc = NULL, *rc = NULL;
  OK(o->listen(dev, handle, &lc));
  CHECK(lc != NULL);
  /* NCCL's non-blocking connect/accept, progressed from one thread. */
  double deadline = now() + 10;
  while (!sc || !rc) {
    if (!sc) OK(o->connect(dev, handle, &sc));
    if (!rc) OK(o->accept(lc, &rc));
    CHECK(now() < deadline);
  }

  uint8_t* src = malloc(BUF);
  uint8_t* dst = malloc(BUF);
  CHECK(src && dst);
  void *smh = NULL, *rmh = NULL;
  OK(o->regMr(sc, src, BUF, NCCL_PTR_HOST, &smh));
  OK(o->regMr(rc, dst, BUF, NCCL_PTR_HOST, &rmh));
  CHECK(smh && rmh);

  /* Host memory registered as CUDA fails with a code and a WARN line, never
     aborts: unsupported without GDR mode, a bad argument in it. */
  void* bad = (void*)0x1;
  int before = n_lines;
  CHECK(o->regMr(rc, dst, BUF, NCCL_PTR_CUDA, &bad) ==
        (gdr ? ncclInvalidArgument : ncclInvalidUsage));
  CHECK(bad == NULL);
  CHECK(find_log(before, NCCL_LOG_WARN, "CUDA") >= 0);
  CHECK(o->regMrDmaBuf(rc, dst, BUF, NCCL_PTR_CUDA, 0, 3, &bad) != ncclSuccess);
  void* req = NULL;
  CHECK(o->isend(sc, src + BUF - 10, 11, 1, smh, &req) == ncclInvalidArgument);

  /* Single receives, odd sizes, buffers larger than the message. */
  static const size_t sizes[] = {0, 1, 7, 4097, 65537, 1000003, 3u * 1048576 + 5};
  for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
    size_t n = sizes[k];
    for (size_t i = 0; i < n; i++) src[i] = next_byte();
    memset(dst, 0xa5, n + 64);
    void* rreq = (void*)NCCL_NET_OPTIONAL_RECV_COMPLETION; /* NCCL's LL hint */
    void* rd[1] = {dst};
    size_t rs[1] = {n + 13};
    int tags[1] = {(int)k};
    void* mhs[1] = {rmh};
    OK(o->irecv(rc, 1, rd, rs, tags, mhs, &rreq));
    CHECK(rreq != NULL && rreq != (void*)NCCL_NET_OPTIONAL_RECV_COMPLETION);
    void* sreq = NULL;
    while (!sreq) OK(o->isend(sc, src, n, (int)k, smh, &sreq));
    int ssz[8] = {-1}, rsz[8] = {-1, -1};
    wait_req(o, sreq, ssz);
    wait_req(o, rreq, rsz);
    CHECK(ssz[0] == (int)n);
    CHECK(rsz[0] == (int)n);
    CHECK(rsz[1] == -1); /* only as many sizes as buffers */
    CHECK(memcmp(src, dst, n) == 0);
    CHECK(dst[n] == 0xa5); /* nothing written past the message */
  }

  /* A grouped receive: three buffers, tags matched, sent out of order. */
  {
    size_t len[3] = {1, 777, 100003};
    size_t off[3] = {0, 4096, 1 << 20};
    int tags[3] = {21, 22, 23};
    void* rd[3];
    void* mhs[3] = {rmh, rmh, rmh};
    size_t rs[3];
    for (int i = 0; i < 3; i++) {
      rd[i] = dst + off[i];
      rs[i] = len[i] + 1;
    }
    for (size_t i = 0; i < (2u << 20); i++) src[i] = next_byte();
    memset(dst, 0, 2u << 20);
    void* rreq = NULL;
    OK(o->irecv(rc, 3, rd, rs, tags, mhs, &rreq));
    CHECK(rreq != NULL);
    void* sreq[3] = {0};
    const int order[3] = {0, 1, 2};
    for (int j = 0; j < 3; j++) {
      int i = order[j];
      while (!sreq[i]) OK(o->isend(sc, src + off[i], len[i], tags[i], smh, &sreq[i]));
    }
    for (int i = 0; i < 3; i++) {
      int s[8] = {0};
      wait_req(o, sreq[i], s);
      CHECK(s[0] == (int)len[i]);
    }
    int rsz[8] = {0};
    wait_req(o, rreq, rsz);
    for (int i = 0; i < 3; i++) {
      CHECK(rsz[i] == (int)len[i]);
      CHECK(memcmp(src + off[i], dst + off[i], len[i]) == 0);
    }
  }

  /* iflush: nothing to flush, so NULL (NCCL then skips the test). */
  {
    void* fd[1] = {dst};
    int fs[1] = {1};
    void* fm[1] = {rmh};
    void* freq = (void*)0x1;
    OK(o->iflush(rc, 1, fd, fs, fm, &freq));
    CHECK(freq == NULL);
  }

  OK(o->deregMr(sc, smh));
  OK(o->deregMr(rc, rmh));
  OK(o->closeSend(sc));
  OK(o->closeRecv(rc));
  OK(o->closeListen(lc));
  free(src);
  free(dst);
  printf("nccl-plugin: %s transfers on dev %d ok\n", o->ver, dev);
}

int main(int argc, char** argv) {
  CHECK(argc == 2);
  /* Two loopback "NICs"; set before init, as a job script would. */
  setenv("TCPX_NICS", "127.0.0.1,127.0.0.2", 0);
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) fprintf(stderr, "dlopen: %s\n", dlerror());
  CHECK(lib != NULL);

  n12 = (ncclNet_v12_t*)dlsym(lib, "ncclNetPlugin_v12");
  n11 = (ncclNet_v11_t*)dlsym(lib, "ncclNetPlugin_v11");
  n10 = (ncclNet_v10_t*)dlsym(lib, "ncclNetPlugin_v10");
  n9 = (ncclNet_v9_t*)dlsym(lib, "ncclNetPlugin_v9");
  n8 = (ncclNet_v8_t*)dlsym(lib, "ncclNetPlugin_v8");
  CHECK_TABLE(n12);
  CHECK(n12->finalize != NULL && n12->setNetAttr == NULL && n12->makeVDevice == NULL);
  CHECK_TABLE(n11);
  CHECK(n11->finalize != NULL && n11->setNetAttr == NULL && n11->makeVDevice == NULL);
  CHECK_TABLE(n10);
  CHECK(n10->makeVDevice == NULL);
  CHECK_TABLE(n9);
  CHECK(n9->makeVDevice == NULL);
  CHECK_TABLE(n8);

  /* Before init: an error code, not a crash. */
  int ndev = -1;
  CHECK(n11->devices(&ndev) != ncclSuccess);

  /* v11: per-communicator init with a context. */
  ncclNetCommConfig_t cfg = {-1};
  OK(n11->init(&ctx11, 42, &cfg, logger, NULL));
  CHECK(ctx11 != NULL);
  CHECK(find_log(0, NCCL_LOG_INFO, "data path") >= 0);
  int l = find_log(0, NCCL_LOG_INFO, "data path");
  CHECK((log_flags[l] & 0x1) && (log_flags[l] & 0x10)); /* NCCL_INIT|NCCL_NET */
  const char* gdr_env = getenv("TCPX_NCCL_GDR");
  if (gdr_env && strcmp(gdr_env, "1") == 0) {
    /* Offered only where CUDA memory can be registered; said so otherwise. */
    gdr = find_log(0, NCCL_LOG_WARN, "TCPX_NCCL_GDR=1 but") < 0;
    CHECK(find_log(0, NCCL_LOG_INFO, gdr ? "pointers: host and CUDA" : "pointers: host only") >= 0);
  }
  OK(n11->devices(&ndev));
  CHECK(ndev == 2);

  ncclNetProperties_v11_t p[2];
  for (int d = 0; d < 2; d++) {
    memset(&p[d], 0x5a, sizeof p[d]);
    OK(n11->getProperties(d, &p[d]));
    CHECK(p[d].name != NULL);
    CHECK(p[d].ptrSupport == (gdr ? NCCL_PTR_HOST | NCCL_PTR_CUDA : NCCL_PTR_HOST));
    CHECK(p[d].regIsGlobal == 0 && p[d].forceFlush == 0);
    CHECK(p[d].speed > 0 && p[d].maxComms > 0);
    CHECK(p[d].maxRecvs == 8);
    CHECK(p[d].netDeviceType == 0 && p[d].netDeviceVersion == 0);
    CHECK(p[d].vProps.ndevs == 1 && p[d].vProps.devs[0] == d);
    CHECK(p[d].maxP2pBytes == (size_t)1 << 30 && p[d].maxCollBytes == (size_t)512 << 20);
    CHECK(p[d].maxMultiRequestSize == 1);
    CHECK(p[d].guid == (uint64_t)d);
  }
  CHECK(strcmp(p[0].name, p[1].name) != 0); /* NCCL keys its topology by name */
  CHECK(n11->getProperties(7, &p[0]) == ncclInvalidArgument);

  /* v12: the same context, rail and plane ids unknown, 8-device vProps. */
  OK(n12->init(&ctx12, 43, &cfg, logger, NULL));
  ncclNetProperties_v12_t p12;
  memset(&p12, 0x5a, sizeof p12);
  OK(n12->getProperties(1, &p12));
  CHECK((p12.ptrSupport & ~NCCL_PTR_CUDA) == NCCL_PTR_HOST && p12.maxRecvs == 8 && p12.guid == 1);
  CHECK(p12.vProps.ndevs == 1 && p12.vProps.devs[0] == 1);
  for (int i = 1; i < 8; i++) CHECK(p12.vProps.devs[i] == 0);
  CHECK(p12.maxP2pBytes == (size_t)1 << 30 && p12.maxMultiRequestSize == 1);
  CHECK(p12.railId == -1 && p12.planeId == -1);
  CHECK(strcmp(p12.name, p[1].name) == 0);

  ncclNetProperties_v8_t p8;
  OK(n8->init(logger));
  OK(n8->getProperties(1, &p8));
  CHECK((p8.ptrSupport & ~NCCL_PTR_CUDA) == NCCL_PTR_HOST && p8.maxRecvs == 8 && p8.speed > 0);
  ncclNetProperties_v9_t p9;
  OK(n9->init(logger));
  OK(n9->getProperties(0, &p9));
  CHECK(p9.maxP2pBytes == (size_t)1 << 30 && p9.vProps.ndevs == 1);
  OK(n10->init(logger, NULL));

  struct ops o12 = {.ver = "v12", .listen = l12, .connect = c12, .accept = a12,
                    .isend = s12, .irecv = r12, COMMON(n12)};
  struct ops o11 = {.ver = "v11", .listen = l11, .connect = c11, .accept = a11,
                    .isend = s11, .irecv = r11, COMMON(n11)};
  struct ops o10 = {.ver = "v10", .listen = l10, .connect = c10, .accept = a10,
                    .isend = s10, .irecv = r10, COMMON(n10)};
  struct ops o9 = {.ver = "v9", .listen = l9, .connect = c9, .accept = a9,
                   .isend = s9, .irecv = r9, COMMON(n9)};
  struct ops o8 = {.ver = "v8", .listen = l8, .connect = c8, .accept = a8,
                   .isend = s8, .irecv = r8, COMMON(n8)};
  transfer(&o12, 1);
  transfer(&o11, 0);
  transfer(&o10, 1);
  transfer(&o9, 0);
  transfer(&o8, 1);

  /* TCPX_NCCL_TRACE=1: one INFO/NET line per call; otherwise none. */
  const char* tr = getenv("TCPX_NCCL_TRACE");
  static const char* traced[] = {"trace regMr comm", "trace regMr done mh", "trace isend comm",
                                 "trace irecv comm", "trace test req", "trace iflush comm",
                                 "trace deregMr mh", "trace closeSend", "trace closeRecv",
                                 "trace closeListen"};
  for (size_t i = 0; i < sizeof traced / sizeof traced[0]; i++) {
    int at = find_log(0, NCCL_LOG_INFO, traced[i]);
    if (tr && strcmp(tr, "1") == 0) {
      CHECK(at >= 0);
      CHECK(log_flags[at] == 0x10); /* NCCL_NET */
    } else {
      CHECK(at < 0);
    }
  }
  if (tr && strcmp(tr, "1") == 0) {
    /* The grouped receive names each buffer's size and tag; a done test its sizes. */
    CHECK(find_log(0, NCCL_LOG_INFO, "n 3 [") >= 0);
    CHECK(find_log(0, NCCL_LOG_INFO, "+778 tag 22 mh") >= 0);
    CHECK(find_log(0, NCCL_LOG_INFO, "done sizes [1, 777, 100003]") >= 0);
    CHECK(find_log(0, NCCL_LOG_INFO, "type CUDA kind") >= 0);
  }

  OK(n12->finalize(ctx12));
  OK(n11->finalize(ctx11));
  if (getenv("NET_PLUGIN_DUMP_LOG")) dump_log();
  printf("nccl-plugin: ok (%d log lines)\n", n_lines);
  return 0;
}
