"""Integrations of fusedattn with other libraries; each is imported explicitly and needs that library.

    from fusedattn.integrations import transformers as fusedattn_hf   # Hugging Face transformers >= 5
    fusedattn_hf.register()
"""
