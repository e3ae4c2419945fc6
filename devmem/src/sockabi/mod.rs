//! The kernel devmem socket ABI: cmsgs, fragments and token return for TCPX and upstream kernels.
