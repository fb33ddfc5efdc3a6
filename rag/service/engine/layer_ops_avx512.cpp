// layer_ops.cpp again, compiled for AVX-512 into a library of its own (setup.py): a file of its
// own name, so that its object file is not the AVX2 build's.
#include "layer_ops.cpp"
