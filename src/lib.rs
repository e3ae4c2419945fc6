//! tcpx
