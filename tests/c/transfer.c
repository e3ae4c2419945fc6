/* Drives a transfer through include/tcpx.h the way a C host (NCCL, NIXL) would:
 * non-blocking connect/accept in one thread, odd-sized random payloads in both
 * directions, byte-exact checks, and the error paths.
 * `transfer causes <empty dir> <mock prefix> <gpu pci>`: the device-memory
 * causes of failed inits instead (tests/c_abi.rs starts the mock gpumemd). */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tcpx.h"

#define CHECK(x)                                                                 \
  do {                                                                           \
    int rc_ = (x);                                                               \
    if (rc_ != TCPX_SUCCESS) {                                                   \
      fprintf(stderr, "%s:%d: %s -> %d (%s)\n", __FILE__, __LINE__, #x, rc_,     \
              tcpx_last_error());                                                \
      exit(1);                                                                   \
    }                                                                            \
  } while (0)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void fill(unsigned char *p, size_t n, unsigned seed) {
  for (size_t i = 0; i < n; i++) {
    seed = seed * 1103515245u + 12345u;
    p[i] = (unsigned char)(seed >> 16);
  }
}

/* Polls both requests until done; fails after 20 s. */
static void finish(tcpx_request *a, tcpx_request *b, size_t *size_b) {
  int da = a == NULL, db = b == NULL;
  double t0 = now();
  while (!da || !db) {
    if (!da) CHECK(tcpx_test(a, &da, NULL));
    if (!db) CHECK(tcpx_test(b, &db, size_b));
    if (now() - t0 > 20) {
      fprintf(stderr, "transfer hung\n");
      exit(1);
    }
  }
}

static void transfer(tcpx_net *net, tcpx_send_comm *s, tcpx_recv_comm *r, size_t n, unsigned seed) {
  unsigned char *src = malloc(n + 1), *dst = malloc(n + 8);
  fill(src, n, seed);
  memset(dst, 0xAB, n + 8);
  tcpx_mr *ms, *md;
  CHECK(tcpx_reg_mr(net, src, n + 1, TCPX_PTR_HOST, &ms));
  CHECK(tcpx_reg_mr(net, dst, n + 8, TCPX_PTR_HOST, &md));
  tcpx_request *rr = NULL, *sr = NULL;
  void *dp = dst + 1;
  size_t cap = n + 7;
  int tag = (int)seed;
  CHECK(tcpx_irecv(r, 1, &dp, &cap, &tag, &md, &rr));
  CHECK(tcpx_isend(s, src, n, tag, ms, &sr));
  if (!rr || !sr) { fprintf(stderr, "no request slot\n"); exit(1); }
  size_t got = 0;
  finish(sr, rr, &got);
  if (got != n || memcmp(dst + 1, src, n) != 0 || dst[0] != 0xAB || dst[n + 1] != 0xAB) {
    fprintf(stderr, "data mismatch at size %zu (got %zu)\n", n, got);
    exit(1);
  }
  CHECK(tcpx_dereg_mr(net, ms));
  CHECK(tcpx_dereg_mr(net, md));
  free(src);
  free(dst);
}

/* No daemon at one prefix, a pipe for a pool at the other: TCPX_EGPUMEMD /
 * TCPX_CAUSE_GPUMEMD_ABSENT against TCPX_EDEVMEM / TCPX_CAUSE_POOL_FD_BAD. */
static int causes(const char *absent, const char *mock, const char *pci) {
  tcpx_net *net = NULL;
  setenv("TCPX_GPU_PCI", pci, 1);
  setenv("TCPX_DEVMEM", "require", 1);
  setenv("TCPX_GPUMEMD_PREFIX", absent, 1);
  int rc = tcpx_init("127.0.0.1", &net);
  if (rc != TCPX_EGPUMEMD || tcpx_last_error_cause() != TCPX_CAUSE_GPUMEMD_ABSENT || net) {
    fprintf(stderr, "absent daemon: %d cause %d (%s)\n", rc, tcpx_last_error_cause(), tcpx_last_error());
    return 1;
  }
  setenv("TCPX_GPUMEMD_PREFIX", mock, 1);
  rc = tcpx_init("127.0.0.1", &net);
  if (rc != TCPX_EDEVMEM || tcpx_last_error_cause() != TCPX_CAUSE_POOL_FD_BAD || net) {
    fprintf(stderr, "bad pool fd: %d cause %d (%s)\n", rc, tcpx_last_error_cause(), tcpx_last_error());
    return 1;
  }
  /* A failure without a device-memory cause clears it. */
  if (tcpx_devices(NULL, NULL) != TCPX_EINVAL || tcpx_last_error_cause() != TCPX_CAUSE_NONE) return 1;
  printf("c-abi causes: ok\n");
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 5 && strcmp(argv[1], "causes") == 0) return causes(argv[2], argv[3], argv[4]);
  tcpx_net *net;
  CHECK(tcpx_init("127.0.0.1,127.0.0.2,127.0.0.3", &net));
  int ndev = 0;
  CHECK(tcpx_devices(net, &ndev));
  if (ndev != 3) { fprintf(stderr, "ndev %d\n", ndev); return 1; }
  tcpx_properties p;
  CHECK(tcpx_get_properties(net, 1, &p));
  if (strcmp(p.addr, "127.0.0.2") != 0 || !(p.ptr_support & TCPX_PTR_HOST) || p.max_recvs != TCPX_MAX_RECVS) {
    fprintf(stderr, "bad properties %s %d\n", p.addr, p.ptr_support);
    return 1;
  }
  if (tcpx_get_properties(net, 7, &p) != TCPX_ENODEV || strlen(tcpx_last_error()) == 0) return 1;

  /* Two comms, one per direction, set up in a single thread. */
  unsigned char h1[TCPX_HANDLE_SIZE], h2[TCPX_HANDLE_SIZE];
  tcpx_listen_comm *l1, *l2;
  CHECK(tcpx_listen(net, 0, h1, &l1));
  CHECK(tcpx_listen(net, 2, h2, &l2));
  tcpx_send_comm *s1 = NULL, *s2 = NULL;
  tcpx_recv_comm *r1 = NULL, *r2 = NULL;
  double t0 = now();
  while (!s1 || !s2 || !r1 || !r2) {
    if (!s1) CHECK(tcpx_connect(net, 0, h1, &s1));
    if (!s2) CHECK(tcpx_connect(net, 2, h2, &s2));
    if (!r1) CHECK(tcpx_accept(l1, &r1));
    if (!r2) CHECK(tcpx_accept(l2, &r2));
    if (now() - t0 > 20) { fprintf(stderr, "connect hung\n"); return 1; }
  }

  size_t sizes[] = {0, 1, 13, 4095, 65537, 1000003, 3 * 524288 + 5};
  for (unsigned i = 0; i < sizeof sizes / sizeof *sizes; i++) {
    transfer(net, s1, r1, sizes[i], 11 + i);
    transfer(net, s2, r2, sizes[i], 97 + i);
  }

  /* tcpx_test's argument errors touch no request: it stays valid and completes. */
  {
    unsigned char a[16] = {1}, b[16] = {0};
    tcpx_mr *ma, *mb;
    CHECK(tcpx_reg_mr(net, a, sizeof a, TCPX_PTR_HOST, &ma));
    CHECK(tcpx_reg_mr(net, b, sizeof b, TCPX_PTR_HOST, &mb));
    void *bp = b;
    size_t bcap = sizeof b;
    int t = 5, done = 7;
    tcpx_request *rr = NULL, *sr = NULL;
    CHECK(tcpx_irecv(r1, 1, &bp, &bcap, &t, &mb, &rr));
    if (tcpx_test(rr, NULL, NULL) != TCPX_EINVAL) return 1;
    if (tcpx_test(NULL, &done, NULL) != TCPX_EINVAL || done != 0) return 1;
    CHECK(tcpx_isend(s1, a, sizeof a, t, ma, &sr));
    size_t got = 0;
    finish(sr, rr, &got);
    if (got != sizeof a || b[0] != 1) { fprintf(stderr, "request lost after EINVAL\n"); return 1; }
    CHECK(tcpx_dereg_mr(net, ma));
    CHECK(tcpx_dereg_mr(net, mb));
  }

  /* Error paths: a garbage handle, a buffer outside its region, a truncating receive. */
  unsigned char junk[TCPX_HANDLE_SIZE];
  memset(junk, 0x5A, sizeof junk);
  tcpx_send_comm *bad = NULL;
  if (tcpx_connect(net, 0, junk, &bad) != TCPX_EBADHANDLE || bad) return 1;
  unsigned char small[8], big[64] = {0};
  tcpx_mr *msmall, *mbig;
  CHECK(tcpx_reg_mr(net, small, sizeof small, TCPX_PTR_HOST, &msmall));
  CHECK(tcpx_reg_mr(net, big, sizeof big, TCPX_PTR_HOST, &mbig));
  tcpx_request *req = NULL;
  if (tcpx_isend(s1, big, 65, 0, mbig, &req) != TCPX_EINVAL) return 1;
  void *sp = small;
  size_t scap = sizeof small;
  int tag = 3;
  CHECK(tcpx_irecv(r1, 1, &sp, &scap, &tag, &msmall, &req));
  tcpx_request *sreq = NULL;
  CHECK(tcpx_isend(s1, big, sizeof big, 3, mbig, &sreq));
  int done = 0, rc = TCPX_SUCCESS;
  t0 = now();
  while (!done && rc == TCPX_SUCCESS && now() - t0 < 20) rc = tcpx_test(req, &done, NULL);
  if (rc != TCPX_ETRUNCATED) { fprintf(stderr, "expected truncation, got %d\n", rc); return 1; }
  finish(sreq, NULL, NULL);
  if (tcpx_dereg_mr(net, mbig) != TCPX_SUCCESS) return 1;
  CHECK(tcpx_dereg_mr(net, msmall));

  CHECK(tcpx_close_send(s1));
  CHECK(tcpx_close_send(s2));
  CHECK(tcpx_close_recv(r1));
  CHECK(tcpx_close_recv(r2));
  CHECK(tcpx_close_listen(l1));
  CHECK(tcpx_close_listen(l2));
  CHECK(tcpx_finalize(net));
  printf("c-abi: ok\n");
  return 0;
}
