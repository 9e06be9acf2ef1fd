class KSampler:
    SAMPLERS = ["euler"]
    SCHEDULERS = ["normal"]
