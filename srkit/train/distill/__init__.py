"""One-step distillation maths: SiD (EDM σ and DDPM ᾱ forms), GenDR's CiD and CiDA, as functions over networks
the recipe plugs in.  Import from the module that defines a name (the package re-exports nothing).

- vp.py: z_t = √ᾱ·z + √(1−ᾱ)·ε, x0 from ε, classifier-free guidance, prompt dropout (dtype-generic).
- sid.py: SiD's generator and fake-score losses, weight factor, reduction.
- cid.py: CiD (Eqs. 7–9) and its settings.
- cida.py: the adversarial and REPA terms, Eq. 11, and CiDA's settings.
- toy.py: a 2-D distillation that shows the losses learn (tests, benchmarks/toy_distill.py).
"""
