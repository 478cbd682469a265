//! Link impairments: loss, duplication, delay and reordering. Being written.
