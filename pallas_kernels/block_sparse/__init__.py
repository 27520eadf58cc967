"""Block-sparse flash attention kernels driven by a BlockMask."""
