/* Test-only C declarations of NCCL's net plugin ABI (v8..v12), written
 * from the facts in NVIDIA/nccl v2.28.7-1 src/include/plugin/net/net_v*.h,
 * src/include/plugin/nccl_net.h, src/include/nccl_common.h and
 * src/nccl.h.in. Independent of the Rust declarations (src/abi.rs); the
 * static asserts below pin the same LP64 sizes and offsets. */
#ifndef TCPX_TEST_NCCL_NET_DECLS_H
#define TCPX_TEST_NCCL_NET_DECLS_H

#include <stddef.h>
#include <stdint.h>

typedef int ncclResult_t; /* ncclSuccess 0, ncclSystemError 2, ncclInternalError 3,
                             ncclInvalidArgument 4, ncclInvalidUsage 5, ncclRemoteError 6 */
enum { ncclSuccess = 0, ncclInvalidArgument = 4, ncclInvalidUsage = 5 };

typedef enum { NCCL_LOG_NONE = 0, NCCL_LOG_VERSION = 1, NCCL_LOG_WARN = 2, NCCL_LOG_INFO = 3,
               NCCL_LOG_ABORT = 4, NCCL_LOG_TRACE = 5 } ncclDebugLogLevel;
typedef void (*ncclDebugLogger_t)(ncclDebugLogLevel level, unsigned long flags, const char* file,
                                  int line, const char* fmt, ...);
typedef void* ncclProfilerCallback_t; /* opaque here */

#define NCCL_PTR_HOST 0x1
#define NCCL_PTR_CUDA 0x2
#define NCCL_NET_HANDLE_MAXSIZE 128
#define NCCL_NET_OPTIONAL_RECV_COMPLETION 0x1

typedef struct { int ndevs; int devs[4]; } ncclNetVDeviceProps_t;
typedef struct { int trafficClass; } ncclNetCommConfig_t;

typedef struct {
  char* name; char* pciPath; uint64_t guid;
  int ptrSupport, regIsGlobal, speed, port; float latency;
  int maxComms, maxRecvs, netDeviceType, netDeviceVersion;
} ncclNetProperties_v8_t;

typedef struct {
  char* name; char* pciPath; uint64_t guid;
  int ptrSupport, regIsGlobal, forceFlush, speed, port; float latency;
  int maxComms, maxRecvs, netDeviceType, netDeviceVersion;
  ncclNetVDeviceProps_t vProps;
  size_t maxP2pBytes, maxCollBytes;
} ncclNetProperties_v9_t;
typedef ncclNetProperties_v9_t ncclNetProperties_v10_t;

typedef struct {
  char* name; char* pciPath; uint64_t guid;
  int ptrSupport, regIsGlobal, forceFlush, speed, port; float latency;
  int maxComms, maxRecvs, netDeviceType, netDeviceVersion;
  ncclNetVDeviceProps_t vProps;
  size_t maxP2pBytes, maxCollBytes;
  int maxMultiRequestSize;
} ncclNetProperties_v11_t;

typedef struct {
  int ndevs;
  int devs[8];
} ncclNetVDeviceProps_v12_t;

typedef struct {
  char* name; char* pciPath; uint64_t guid;
  int ptrSupport, regIsGlobal, forceFlush, speed, port; float latency;
  int maxComms, maxRecvs, netDeviceType, netDeviceVersion;
  ncclNetVDeviceProps_v12_t vProps;
  size_t maxP2pBytes, maxCollBytes;
  int maxMultiRequestSize;
  int16_t railId, planeId;
} ncclNetProperties_v12_t;

typedef void* devh_t; /* ncclNetDeviceHandle_vN_t*, unused by host plugins */

#define NCCL_NET_COMMON_TAIL                                                                  \
  ncclResult_t (*accept)(void* listenComm, void** recvComm, devh_t* recvDevComm);             \
  ncclResult_t (*regMr)(void* comm, void* data, size_t size, int type, void** mhandle);       \
  ncclResult_t (*regMrDmaBuf)(void* comm, void* data, size_t size, int type, uint64_t offset, \
                              int fd, void** mhandle);                                        \
  ncclResult_t (*deregMr)(void* comm, void* mhandle);

#define NCCL_NET_TEST_CLOSE                                                                   \
  ncclResult_t (*iflush)(void* recvComm, int n, void** data, int* sizes, void** mhandles,     \
                         void** request);                                                     \
  ncclResult_t (*test)(void* request, int* done, int* sizes);                                 \
  ncclResult_t (*closeSend)(void* sendComm);                                                  \
  ncclResult_t (*closeRecv)(void* recvComm);                                                  \
  ncclResult_t (*closeListen)(void* listenComm);                                              \
  ncclResult_t (*getDeviceMr)(void* comm, void* mhandle, void** dptr_mhandle);                \
  ncclResult_t (*irecvConsumed)(void* recvComm, int n, void* request);

typedef struct {
  const char* name;
  ncclResult_t (*init)(ncclDebugLogger_t logFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v8_t* props);
  ncclResult_t (*listen)(int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(int dev, void* handle, void** sendComm, devh_t* sendDevComm);
  NCCL_NET_COMMON_TAIL
  ncclResult_t (*isend)(void* sendComm, void* data, int size, int tag, void* mhandle, void** request);
  ncclResult_t (*irecv)(void* recvComm, int n, void** data, int* sizes, int* tags, void** mhandles,
                        void** request);
  NCCL_NET_TEST_CLOSE
} ncclNet_v8_t;

typedef struct {
  const char* name;
  ncclResult_t (*init)(ncclDebugLogger_t logFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v9_t* props);
  ncclResult_t (*listen)(int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(int dev, void* handle, void** sendComm, devh_t* sendDevComm);
  NCCL_NET_COMMON_TAIL
  ncclResult_t (*isend)(void* sendComm, void* data, size_t size, int tag, void* mhandle, void** request);
  ncclResult_t (*irecv)(void* recvComm, int n, void** data, size_t* sizes, int* tags,
                        void** mhandles, void** request);
  NCCL_NET_TEST_CLOSE
  ncclResult_t (*makeVDevice)(int* d, ncclNetVDeviceProps_t* props);
} ncclNet_v9_t;

typedef struct {
  const char* name;
  ncclResult_t (*init)(ncclDebugLogger_t logFunction, ncclProfilerCallback_t profFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v10_t* props);
  ncclResult_t (*listen)(int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(int dev, ncclNetCommConfig_t* config, void* handle, void** sendComm,
                          devh_t* sendDevComm);
  NCCL_NET_COMMON_TAIL
  ncclResult_t (*isend)(void* sendComm, void* data, size_t size, int tag, void* mhandle,
                        void* phandle, void** request);
  ncclResult_t (*irecv)(void* recvComm, int n, void** data, size_t* sizes, int* tags,
                        void** mhandles, void** phandles, void** request);
  NCCL_NET_TEST_CLOSE
  ncclResult_t (*makeVDevice)(int* d, ncclNetVDeviceProps_t* props);
} ncclNet_v10_t;

typedef struct {
  const char* name;
  ncclResult_t (*init)(void** ctx, uint64_t commId, ncclNetCommConfig_t* config,
                       ncclDebugLogger_t logFunction, ncclProfilerCallback_t profFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v11_t* props);
  ncclResult_t (*listen)(void* ctx, int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(void* ctx, int dev, void* handle, void** sendComm, devh_t* sendDevComm);
  NCCL_NET_COMMON_TAIL
  ncclResult_t (*isend)(void* sendComm, void* data, size_t size, int tag, void* mhandle,
                        void* phandle, void** request);
  ncclResult_t (*irecv)(void* recvComm, int n, void** data, size_t* sizes, int* tags,
                        void** mhandles, void** phandles, void** request);
  NCCL_NET_TEST_CLOSE
  ncclResult_t (*makeVDevice)(int* d, ncclNetVDeviceProps_t* props);
  ncclResult_t (*finalize)(void* ctx);
  ncclResult_t (*setNetAttr)(void* ctx, void* netAttr);
} ncclNet_v11_t;

typedef struct {
  const char* name;
  ncclResult_t (*init)(void** ctx, uint64_t commId, ncclNetCommConfig_t* config,
                       ncclDebugLogger_t logFunction, ncclProfilerCallback_t profFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, ncclNetProperties_v12_t* props);
  ncclResult_t (*listen)(void* ctx, int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(void* ctx, int dev, void* handle, void** sendComm, devh_t* sendDevComm);
  NCCL_NET_COMMON_TAIL
  ncclResult_t (*isend)(void* sendComm, void* data, size_t size, int tag, void* mhandle,
                        void* phandle, void** request);
  ncclResult_t (*irecv)(void* recvComm, int n, void** data, size_t* sizes, int* tags,
                        void** mhandles, void** phandles, void** request);
  NCCL_NET_TEST_CLOSE
  ncclResult_t (*makeVDevice)(int* d, ncclNetVDeviceProps_v12_t* props);
  ncclResult_t (*finalize)(void* ctx);
  ncclResult_t (*setNetAttr)(void* ctx, void* netAttr);
} ncclNet_v12_t;

_Static_assert(sizeof(ncclNetProperties_v8_t) == 64, "v8 props");
_Static_assert(sizeof(ncclNetProperties_v9_t) == 104, "v9 props");
_Static_assert(offsetof(ncclNetProperties_v9_t, maxP2pBytes) == 88, "v9 maxP2pBytes");
_Static_assert(sizeof(ncclNetProperties_v11_t) == 112, "v11 props");
_Static_assert(offsetof(ncclNetProperties_v11_t, maxMultiRequestSize) == 104, "v11 tail");
_Static_assert(sizeof(ncclNet_v8_t) == 19 * 8, "v8 table");
_Static_assert(sizeof(ncclNet_v9_t) == 20 * 8, "v9 table");
_Static_assert(sizeof(ncclNet_v10_t) == 20 * 8, "v10 table");
_Static_assert(sizeof(ncclNet_v11_t) == 22 * 8, "v11 table");
_Static_assert(offsetof(ncclNet_v11_t, finalize) == 20 * 8, "v11 finalize");
_Static_assert(sizeof(ncclNetVDeviceProps_v12_t) == 36, "v12 vprops");
_Static_assert(sizeof(ncclNetProperties_v12_t) == 128, "v12 props");
_Static_assert(offsetof(ncclNetProperties_v12_t, maxP2pBytes) == 104, "v12 maxP2pBytes");
_Static_assert(offsetof(ncclNetProperties_v12_t, railId) == 124, "v12 railId");
_Static_assert(offsetof(ncclNetProperties_v12_t, planeId) == 126, "v12 planeId");
_Static_assert(sizeof(ncclNet_v12_t) == 22 * 8, "v12 table");
_Static_assert(offsetof(ncclNet_v12_t, finalize) == 20 * 8, "v12 finalize");

#endif
