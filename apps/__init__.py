"""Applications built on the three tools: `demo` (the whole pipeline offline), `pipeline` (one recipe from
conversion to publishing; `pipeline_recipe` is its recipe model), `publish` (model card and Hub upload), and
`scratch` (tokenizer, fresh model and training runs shared by the demo and the reproduction). Only this layer may
import more than one tool.
"""
