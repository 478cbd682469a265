//! Packet captures on a host's wire interface (tcpdump). Being written.
