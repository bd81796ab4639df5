"""Kernels below the models: convolutions (`conv`, with the CPU paths of `cpu_conv` chosen by
`conv_impl`) and mixed-precision dots (`mixed`). They import nothing from the rest of the
package."""
