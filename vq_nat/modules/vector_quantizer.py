"""Vector quantization bottleneck: VQ-VAE with hard EM or soft EM codebook learning (Roy et al. 2018).

Notation follows the paper: z_e(x) the encoder output, e_j (j = 1..K) the code embeddings, z_q(x) the
quantized vector fed to the decoder, c_j and m_j the EMA counts and sums of the M-step.

Plain PyTorch: no fairseq import, so ``image_ae`` and other users can take it alone.
"""
import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import as_padding_mask, check_choice, check_codes, check_features, check_float, check_int
from .distributed import all_reduce_sum, broadcast_, first_rank_with
from .output import QuantizerOutput, code_perplexity
from .schedules import annealed_temperature

logger = logging.getLogger(__name__)

# buffers that must stay fp32 even after module.half() / .bfloat16() (0.001 * count vanishes in fp16)
_FP32_BUFFERS = ("embed", "ema_count", "ema_sum", "current_temperature")
# score-matrix entries computed at once by the E-step (8M fp32 = 32 MB): rows per chunk = this // K
MIN_TEMPERATURE = 1e-4  # the smallest soft-EM temperature (see VectorQuantizer)
_CHUNK_SCORES = 1 << 23


class VectorQuantizer(nn.Module):
    """Discrete bottleneck ``z_e -> z_q`` with a K-entry codebook (optionally K per slice: product quantization).

    Args:
        num_codes: K, codebook size (per block).
        dim: size of z_e's last dimension.
        assignment: ``"hard"`` (nearest code, eq.1: the E-step of hard EM) or ``"soft"`` (draw ``num_samples``
            codes from Multinomial(logits = -||e_j - z_e||^2 / temperature): the E-step of soft EM, §3.2).
        num_samples: m, samples per position for soft EM.
        update: ``"ema"`` (M-step by exponential moving averages of counts and sums, eq.4-5) or ``"grad"``
            (codebook is an ``nn.Parameter`` trained by the codebook loss of eq.3).
        decay: lambda of eq.4-5 (0.999 in the paper).
        epsilon: Laplace smoothing of the EMA counts (1e-5 in the paper).
        beta: commitment-loss weight (eq.2).
        num_blocks: product quantization (DVQ, Kaiser et al. 2018): z_e is cut into ``num_blocks`` slices of
            ``dim / num_blocks``, each quantized with its own K-code codebook.
        temperature: soft-EM temperature dividing the logits (1 = the paper).
        anneal_updates: soft EM: anneal the temperature geometrically from ``temperature`` to 1 over this many
            updates (``set_num_updates``; 0 = constant); the current value is saved with the module.
        kmeans_init: initialise the codebook by k-means on the first training batch (beyond the paper).
        dead_code_threshold: after each EMA update, codes whose EMA count is below this are re-seeded with
            random encoder outputs of the batch and their EMA state reset (beyond the paper; 0 = off).
    """

    @classmethod
    def for_bottleneck(cls, bottleneck: str, dim: int, **settings) -> "VectorQuantizer":
        """The one mapping of a bottleneck name onto this class (the Latent Transformer's ``--bottleneck`` and
        image_ae's): "vq" = hard assignment (VQ-VAE, hard EM), "em" = soft EM; ``settings``: the other arguments."""
        check_choice(cls.__name__, "bottleneck", bottleneck, ("vq", "em"))
        return cls(dim=dim, assignment="hard" if bottleneck == "vq" else "soft", **settings)

    def __init__(self, num_codes: int, dim: int, assignment: str = "hard", num_samples: int = 10,
                 update: str = "ema", decay: float = 0.999, epsilon: float = 1e-5, beta: float = 0.25,
                 num_blocks: int = 1, temperature: float = 1.0, anneal_updates: int = 0, kmeans_init: bool = False,
                 kmeans_iters: int = 10, dead_code_threshold: float = 0.0):
        super().__init__()
        owner = type(self).__name__
        check_choice(owner, "assignment", assignment, ("hard", "soft"))
        check_choice(owner, "update", update, ("ema", "grad"))
        check_int(owner, "num_codes", num_codes, 1)
        check_int(owner, "dim", dim, 1)
        check_int(owner, "num_samples", num_samples, 1)
        check_int(owner, "num_blocks", num_blocks, 1, dim)
        if dim % num_blocks != 0:
            raise ValueError(f"{owner}: dim={dim} is not divisible by num_blocks={num_blocks}; pick num_blocks "
                             f"among the divisors of dim")
        check_float(owner, "decay", decay, 0.0, 1.0, high_open=True)
        # T <= 0 would pick the farthest codes
        # below MIN_TEMPERATURE the scaled scores 2 s_ij / T overflow float32; T -> 0 is hard EM (assignment="hard")
        check_float(owner, "temperature", temperature, MIN_TEMPERATURE)
        check_int(owner, "anneal_updates", anneal_updates, 0)
        if anneal_updates > 0 and assignment == "hard":
            logger.warning("%s: anneal_updates=%d has no effect with assignment='hard' (no temperature); set it to "
                           "0 or use assignment='soft'", owner, anneal_updates)
        check_float(owner, "epsilon", epsilon, 0.0)
        check_float(owner, "beta", beta, 0.0)
        check_float(owner, "dead_code_threshold", dead_code_threshold, 0.0)
        check_int(owner, "kmeans_iters", kmeans_iters, 0)
        if dead_code_threshold > 0 and update == "grad":
            logger.warning("%s: dead_code_threshold=%s has no effect with update='grad' (re-seeding uses the EMA "
                           "counts of update='ema'); set it to 0 or use update='ema'", owner, dead_code_threshold)
        self.num_codes = num_codes
        self.dim = dim
        self.assignment = assignment
        self.num_samples = num_samples if assignment == "soft" else 1
        self.update = update
        self.decay = decay
        self.epsilon = epsilon
        self.beta = beta
        self.num_blocks = num_blocks
        self.block_dim = dim // num_blocks
        self.temperature = temperature  # the current one: annealed from start_temperature by set_num_updates
        self.start_temperature = temperature
        self.anneal_updates = anneal_updates
        if anneal_updates > 0:  # saved, so that a loaded checkpoint encodes with the temperature it reached
            self.register_buffer("current_temperature", torch.tensor(float(temperature)))
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = dead_code_threshold

        # e_j ~ N(0, I): on the scale of a layer-normalised z_e (at T=1 the posterior is then nearly one-hot)
        init = torch.randn(num_blocks, num_codes, self.block_dim)
        if update == "grad":
            self.embed = nn.Parameter(init)
        else:
            self.register_buffer("embed", init)
            # c_j starts at 1 and m_j at e_j, so e_j = m_j / c_j holds from the start and a code that is
            # never used keeps its value instead of being divided by a vanishing count.
            self.register_buffer("ema_count", torch.ones(num_blocks, num_codes))
            self.register_buffer("ema_sum", init.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    # ------------------------------------------------------------------ public helpers
    @property
    def codebook(self) -> torch.Tensor:
        """The code embeddings e_j: (num_codes, dim), or (num_blocks, num_codes, dim / num_blocks)."""
        return self.embed[0] if self.num_blocks == 1 else self.embed

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices -> z_q. ``codes``: (...) long (or (..., num_blocks) with product quantization)."""
        check_codes(type(self).__name__, codes, self.num_codes, self.embed.device)
        if self.num_blocks > 1 and (codes.dim() == 0 or codes.size(-1) != self.num_blocks):
            raise ValueError(f"{type(self).__name__}: with num_blocks={self.num_blocks}, codes must have shape "
                             f"(..., {self.num_blocks}), got {tuple(codes.shape)}")
        if self.num_blocks == 1:
            return F.embedding(codes, self.embed[0])
        offsets = torch.arange(self.num_blocks, device=codes.device) * self.num_codes
        flat = self.embed.reshape(-1, self.block_dim)
        return F.embedding(codes + offsets, flat).flatten(-2)

    @torch.no_grad()
    def nearest_codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """eq.1 without sampling or any update: argmin_j ||z_e - e_j||, (...) long (or (..., num_blocks))."""
        check_features(type(self).__name__, self, z_e, self.dim)
        x = z_e.reshape(z_e.shape[:-1].numel(), self.num_blocks, self.block_dim).float()
        codes = self._e_step(x, sample=False, weight=None)[0][..., 0]  # (N, B)
        return codes.reshape(*z_e.shape[:-1], self.num_blocks) if self.num_blocks > 1 else codes.reshape(z_e.shape[:-1])

    # ------------------------------------------------------------------ forward
    def forward(self, z_e: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> QuantizerOutput:
        check_features(type(self).__name__, self, z_e, self.dim)
        lead = z_e.shape[:-1]
        padding_mask = as_padding_mask(type(self).__name__, padding_mask, lead, z_e.device)
        x = z_e.reshape(lead.numel(), self.num_blocks, self.block_dim)  # (N, B, d)
        n, b, k = x.size(0), self.num_blocks, self.num_codes
        valid = None  # None = every position is real (the fast path)
        if padding_mask is not None and bool(padding_mask.any()):
            valid = ~padding_mask.reshape(-1)
        # the loss covers every real position: a NaN/inf z_e makes it NaN/inf, for fairseq to see (an empty
        # batch has none: its loss is 0)
        real = valid if n > 0 else torch.zeros(0, dtype=torch.bool, device=z_e.device)
        with torch.no_grad():
            # squared norms in fp32: NaN/inf, and values so large that the distances overflow (|z_e| ~ 1e20)
            norms = x.detach().float().square().sum((1, 2))
            if not bool(torch.isfinite(norms.sum())):
                # never let them reach the codebook: such positions are treated as padding by the EM step
                finite = torch.isfinite(norms)
                valid = finite if valid is None else valid & finite
                logger.warning("VectorQuantizer: %d non-finite encoder outputs (NaN, inf or so large that the fp32 "
                               "distances overflow) excluded from the EM statistics", int((~finite).sum()))
        weight = torch.ones(n, device=z_e.device) if valid is None else valid.float()  # (N,)

        # distances, codes and statistics in fp32, also under fp16/bf16 autocast
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            xf = x.detach().float()
            if valid is not None:
                xf = xf.masked_fill(~valid.view(-1, 1, 1), 0.0)
            if self.training and not bool(self.initialized):
                self._kmeans_init(xf if valid is None else xf[valid])
            samples, entropy, posterior_sum = self._e_step(xf, sample=self.assignment == "soft", weight=weight)
            m = samples.size(-1)
            counts, flat, w = self._sample_counts(samples, weight)  # (B*K,) this rank's (averaged) counts
            if self.training and self.update == "ema":
                self._ema_update(xf, flat, w, counts)

        # z_q: hard e_k; soft eq.12: mean of the m sampled embeddings. Gathered from the current codebook
        # (after the EMA step, as in tensor2tensor), with gradient to the codebook when update == "grad".
        z_q = self._mean_embedding(flat, m).reshape(z_e.shape)  # fp32
        ze32 = z_e.float()
        if real is None:
            def sq_err(a, c):
                return F.mse_loss(a, c)
        else:
            mask = real.view(*lead, 1)
            denom = real.sum().clamp(min=1) * self.dim

            def sq_err(a, c):
                return torch.where(mask, (a - c) ** 2, torch.zeros((), device=a.device)).sum() / denom

        # eq.2: commitment loss beta * ||z_e - sg(z_q)||^2, mean over every non-padding scalar entry
        loss = self.beta * sq_err(ze32, z_q.detach())
        if self.update == "grad":
            # eq.3: codebook loss ||sg(z_e) - z_q||^2
            loss = loss + sq_err(ze32.detach(), z_q)

        # straight-through estimator: forward z_q, backward identity to z_e
        quantized = z_e + (z_q.to(z_e.dtype) - z_e).detach()

        usage = counts.view(b, k)
        perplexity = code_perplexity(usage).mean()  # of each block's histogram, averaged
        codes_used = (usage > 0).float().mean()
        # mean E-step posterior entropy over the real positions (and blocks): 0 = one-hot, log K = uniform
        n_real = weight.sum().clamp(min=1.0)
        posterior_entropy = (entropy.mean(-1) * weight).sum() / n_real
        # I(x; j) = H(mean_i q(j | z_e_i)) - mean_i H(q(j | z_e_i)), over the batch's real positions (per block,
        # averaged): the information a code carries about its position; log(code ppl) when q is one-hot
        p = posterior_sum / n_real
        information = -(p * p.clamp(min=1e-12).log()).sum(-1).mean() - posterior_entropy

        codes_out = samples.reshape(*lead, b, m)
        if self.assignment == "hard":
            codes_out = codes_out.squeeze(-1)
        if b == 1:
            codes_out = codes_out.squeeze(len(lead))

        def targets():
            """One-hot (hard) or average of the m one-hots (soft), built only when read: scatter-add of 1/m."""
            t = torch.zeros(n, b, k, device=z_e.device)
            t.scatter_add_(-1, samples, torch.full((1, 1, 1), 1.0 / m, device=z_e.device).expand_as(samples))
            t = t.reshape(*lead, b, k)
            return t.squeeze(-2) if b == 1 else t

        return QuantizerOutput(quantized, codes_out, loss, perplexity, codes_used, make_targets=targets,
                               posterior_entropy=posterior_entropy, information=information)

    # ------------------------------------------------------------------ internals
    def _e_step(self, x: torch.Tensor, sample: bool, weight: Optional[torch.Tensor]):
        """Codes of (N, B, d) fp32 inputs, (N, B, m): eq.1 (``sample=False``, m = 1) or soft EM's m draws; the
        entropy (nats) of each position's E-step posterior q(j | z_e) = softmax_j(-||z_e - e_j||^2 / T), (N, B);
        and sum_i w_i q(j | z_e_i), (B, K), with the position weights ``weight`` (N,) (None: not computed).

        Block by block, in chunks of rows whose (rows x K) score matrix stays near 32 MB: the scores of a chunk
        are reduced (argmax / exp + multinomial / entropy) while they are still in cache, and the N x K matrix is
        never held whole.
        """
        n, b, _ = x.shape
        k = self.num_codes
        m = self.num_samples if sample else 1
        out = torch.empty(n, b, m, dtype=torch.long, device=x.device)
        entropy = torch.empty(n, b, device=x.device)
        posterior_sum = None if weight is None else torch.zeros(b, k, device=x.device)
        rows = max(1, _CHUNK_SCORES // k)
        codebook = self.embed.detach().float()
        scale = 2.0 / self.temperature
        for j in range(b):
            e = codebook[j]
            # s_ij = z_e_i . e_j - ||e_j||^2 / 2 = -(||z_e_i - e_j||^2 - ||z_e_i||^2) / 2: one GEMM with the bias;
            # the posterior's logits -||z_e - e_j||^2 / T are 2 s_ij / T (the row constant ||z_e||^2 / T cancels)
            bias = -0.5 * (e * e).sum(-1)
            for i in range(0, n, rows):
                xi = x[i : i + rows, j]
                logits = torch.addmm(bias, xi, e.t(), beta=scale, alpha=scale)
                # shifted by the row maximum and clamped at e^-80 relative to the best code (< 1e-34: never
                # drawn; its exact value would be a denormal float, which makes exp slow on CPUs)
                shifted = logits.sub_(logits.amax(-1, keepdim=True)).clamp_(min=-80.0)
                weights = shifted.exp()
                # H(q) = log Z - sum_j w_j l_j / Z, with w_j = exp(l_j), Z = sum_j w_j
                total = weights.sum(-1)
                entropy[i : i + rows, j] = total.log() - (weights * shifted).sum(-1) / total
                if weight is not None:  # sum_i w_i q_ij = (w_i / Z_i) . weights_ij, one GEMV
                    posterior_sum[j] += torch.mv(weights.t(), weight[i : i + rows] / total)
                if not sample:
                    # eq.1: z_q(x) = e_k, k = argmin_j ||z_e(x) - e_j|| = argmax_j s_ij
                    out[i : i + rows, j, 0] = shifted.argmax(-1)
                else:
                    # soft EM E-step (section 3.2): m draws with replacement from q(j | z_e)
                    out[i : i + rows, j] = torch.multinomial(weights, m, replacement=True)
        return out, entropy, posterior_sum

    def _sample_counts(self, samples: torch.Tensor, weight: torch.Tensor):
        """Counts sum_i w_ij of each code over this batch (w_ij = share of position i's m draws that are j, 0 for
        padding), plus the flat sample indices into the (B*K) codebook and their weights."""
        n, b, m = samples.shape
        offsets = (torch.arange(b, device=samples.device) * self.num_codes).view(1, b, 1)
        flat = (samples + offsets).reshape(-1)  # (N*B*m,)
        w = (weight / m).view(n, 1, 1).expand(n, b, m).reshape(-1)
        counts = torch.zeros(b * self.num_codes, device=samples.device).index_add_(0, flat, w)
        return counts, flat, w

    def _mean_embedding(self, flat: torch.Tensor, m: int) -> torch.Tensor:
        """(N*B*m,) flat indices into the (B*K) codebook -> (N*B, d) mean of each position's m sampled code
        embeddings (eq.12), via embedding_bag."""
        weight = self.embed.reshape(-1, self.block_dim).float()
        return F.embedding(flat, weight) if m == 1 else F.embedding_bag(flat.view(-1, m), weight, mode="mean")

    @torch.no_grad()
    def _ema_update(self, x: torch.Tensor, flat: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> None:
        """M-step by exponential moving averages (eq.4-5), on the (averaged) sample counts.

        c_j <- lambda c_j + (1 - lambda) sum_i w_ij            (eq.4; w_ij = fraction of the m samples = j)
        m_j <- lambda m_j + (1 - lambda) sum_i w_ij z_e(x_i)   (eq.5)
        c_j <- (c_j + eps) / (sum_k c_k + K eps) * sum_k c_k   (Laplace smoothing)
        e_j <- m_j / c_j
        """
        n, b, d = x.shape
        k = self.num_codes
        m = flat.numel() // max(n * b, 1)  # an empty batch still takes part in the all-reduce below
        rows = x.reshape(n * b, d)
        if x.device.type == "cpu":
            # sum_i w_ij z_e_i as a sparse (B*K x N*B) @ dense product: no N*m x d copy of z_e
            pos = torch.arange(n * b, device=x.device).repeat_interleave(m)
            sel = torch.sparse_coo_tensor(torch.stack([flat, pos]), w, (b * k, n * b), check_invariants=False)
            sums = torch.sparse.mm(sel, rows)
        else:
            src = rows if m == 1 else rows.repeat_interleave(m, dim=0)
            sums = torch.zeros(b * k, d, device=x.device).index_add_(0, flat, src * w.unsqueeze(-1))
        # every rank applies the union batch's statistics, so codebooks never diverge (no-op on one process)
        counts, sums = all_reduce_sum(counts), all_reduce_sum(sums)
        if not bool(counts.sum() > 0):
            return  # an all-padding batch (on every rank): nothing observed, nothing to average in
        counts = counts.view(b, k)
        sums = sums.view(b, k, d)
        lam = self.decay
        self.ema_count.mul_(lam).add_(counts, alpha=1 - lam)  # eq.4
        self.ema_sum.mul_(lam).add_(sums, alpha=1 - lam)  # eq.5
        total = self.ema_count.sum(-1, keepdim=True)
        smoothed = (self.ema_count + self.epsilon) / (total + k * self.epsilon) * total
        self.embed.copy_(self.ema_sum / smoothed.unsqueeze(-1))
        if self.dead_code_threshold > 0:
            self._reseed_dead_codes(x[w.view(n, b, m)[:, 0, 0] > 0])

    @torch.no_grad()
    def _reseed_dead_codes(self, x: torch.Tensor) -> None:
        """Codes whose EMA count fell below the threshold get a random recent encoder output (rank 0's)."""
        dead = self.ema_count < self.dead_code_threshold  # (B, K)
        dead = all_reduce_sum(dead.float()) > 0  # dead on any rank
        if not dead.any():
            return
        b, k, d = self.embed.shape
        if x.size(0) == 0:  # nothing to draw from here; still take part in the broadcast below
            fresh = self.embed.clone()
        else:
            pick = torch.randint(0, x.size(0), (b, k), device=x.device)
            fresh = x[pick, torch.arange(b, device=x.device).view(b, 1)]  # (B, K, d)
        broadcast_(fresh, src=0)
        dead3 = dead.unsqueeze(-1)
        self.embed.copy_(torch.where(dead3, fresh, self.embed))
        self.ema_sum.copy_(torch.where(dead3, fresh, self.ema_sum))
        self.ema_count.copy_(torch.where(dead, torch.ones_like(self.ema_count), self.ema_count))

    @torch.no_grad()
    def _kmeans_init(self, x: torch.Tensor) -> None:
        """Initialise the codebook with k-means (Lloyd) on the first training batch with valid positions: a batch
        that has none (on every rank: all padding, or empty) leaves the codebook uninitialised for the next one.
        The lowest rank that has data computes the codebook every rank takes."""
        b, k, d = self.embed.shape
        n = x.size(0)
        src = first_rank_with(n > 0, x.device)
        if src is None:
            return
        if n == 0:  # nothing to cluster on this rank: it receives rank src's codebook
            cb = torch.empty(b, k, d, device=x.device)
            broadcast_(cb, src=src)
            self._set_codebook(cb)
            return
        xb = x.transpose(0, 1)  # (B, N, d)
        # its own generator, seeded by the run's seed: the same codes whatever else drew from the global RNG
        # before the first batch (e.g. DataLoader workers)
        gen = torch.Generator(device=x.device).manual_seed(torch.initial_seed())
        # k-means++ seeding: each next seed drawn with probability proportional to D(x)^2
        cb = torch.empty(b, k, d, device=x.device)
        cb[:, 0] = xb[torch.arange(b), torch.randint(0, n, (b,), device=x.device, generator=gen)]
        nearest = ((xb - cb[:, :1]) ** 2).sum(-1)  # (B, N)
        for j in range(1, k):
            w = nearest + 1e-12
            pick = torch.multinomial(w / w.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)  # (B,)
            cb[:, j] = xb[torch.arange(b), pick]
            nearest = torch.minimum(nearest, ((xb - cb[:, j : j + 1]) ** 2).sum(-1))
        for _ in range(self.kmeans_iters):
            self.embed.data.copy_(cb)  # the nearest codes of eq.1 by the E-step's own computation
            assign = self._e_step(x, sample=False, weight=None)[0][..., 0]  # (N, B)
            onehot = F.one_hot(assign, k).float().transpose(0, 1)  # (B, N, K)
            counts = onehot.sum(1)  # (B, K)
            sums = torch.bmm(onehot.transpose(1, 2), x.transpose(0, 1))  # (B, K, d)
            cb = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp(min=1).unsqueeze(-1), cb)
        broadcast_(cb, src=src)
        self._set_codebook(cb)

    @torch.no_grad()
    def _set_codebook(self, cb: torch.Tensor) -> None:
        self.embed.data.copy_(cb)
        if self.update == "ema":
            self.ema_count.fill_(1.0)
            self.ema_sum.copy_(cb)
        self.initialized.fill_(True)

    def _apply(self, fn, *args, **kwargs):
        # keep codebook statistics in fp32 under module.half()/.bfloat16() (only follow device moves)
        saved = {name: self._buffers[name] for name in _FP32_BUFFERS if self._buffers.get(name) is not None}
        result = super()._apply(fn, *args, **kwargs)
        for name, old in saved.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return result

    def set_num_updates(self, num_updates: int) -> None:
        """T(step) = start ** (1 - min(step / anneal_updates, 1)) (``schedules.annealed_temperature``)."""
        if self.anneal_updates > 0:
            self.temperature = annealed_temperature(num_updates, self.start_temperature, self.anneal_updates)
            self.current_temperature.fill_(self.temperature)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.anneal_updates > 0:
            self.temperature = float(self.current_temperature)

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, assignment={self.assignment}, "
            f"num_samples={self.num_samples}, update={self.update}, decay={self.decay}, beta={self.beta}, "
            f"num_blocks={self.num_blocks}"
        )
