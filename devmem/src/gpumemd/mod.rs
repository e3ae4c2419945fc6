//! The gpumemd (receive-datapath daemon) UNIX-socket protocol and client.
