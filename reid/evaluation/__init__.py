"""Judging models: retrieval metrics under the Market-1501 protocol (`metrics`), the stream's
assign-or-create accuracy on labelled replays (`stream_accuracy`), the `reid-eval` command
(`evaluate`), the comparison of two embedding versions on stored history behind
`reid-stream validate` (`version_compare`), half-precision agreement (`precision`), model
throughput for the bench (`throughput`) and the figures (`plots`). It may use the training
package's config, data and models to rebuild what it judges; nothing the stream runs imports
this package.
"""
