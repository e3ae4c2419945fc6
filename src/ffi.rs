//! C ABI (see include/tcpx.h).
