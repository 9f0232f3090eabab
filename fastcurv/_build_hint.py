"""How to get the compiled kernels: one text for setup.py (read by path, so building needs no import of
fastcurv or torch) and for the run-time warning and ``fastcurv --version``."""
HOW_TO_GET_KERNELS = ("to get them, install a C++ compiler with Python headers (e.g. `apt install g++ python3-dev`) "
                      "and reinstall with `pip install --no-build-isolation --force-reinstall --no-deps .`")
