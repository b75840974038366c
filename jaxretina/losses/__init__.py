"""Training losses of the ported systems, one module per family (``jaxretina.losses.wsdan``, ...)."""
