//! Steer a TCP 4-tuple to a NIC RX queue: through gpumemd (TCPX kernels) or
//! the ethtool ntuple ioctl (upstream kernels).
