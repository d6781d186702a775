"""What the hardware is and where things go: NVML GPU info, placement groups,
TP process groups.
"""
