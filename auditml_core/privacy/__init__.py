"""Everything a privacy guarantee rests on, one module per concept (Opacus' shape: engines, accountants, checks).

- :mod:`.dp_sgd`: the DP seam. One function turns (model, optimizer, loader, DP config) into their private
  versions; the secret noise and sampling generators; the privacy plan (σ for a target ε).
- :mod:`.accounting`: Opacus' accountants (ε and σ, bit for bit, cached per process).
- :mod:`.second_accountant`: the independent check of every recorded ε (Google's dp-accounting).
- :mod:`.bk`, :mod:`.ghost_conv`: the DP engines (per-sample clipping without materialising per-sample
  gradients); Opacus' hooks remain available through ``dp.grad_sample_mode``.
- :mod:`.user_level`: user-level DP-FedAvg and its accountant; :mod:`.client_noise`: the noise each client
  adds under SecAgg+ (and why ε still holds).
- :mod:`.mia`: membership-inference attacks and the audit statistics.

Nothing is re-exported here: importing the package costs nothing (Opacus is loaded only by the modules that
need it), and each import names the module it uses.
"""
