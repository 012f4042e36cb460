"""The page's two languages, English and Chinese, and how one is chosen.

Labels of Gradio components are translated in the browser by Gradio's own
i18n (`gradio_i18n()`, keyed by `navigator.language`). Text the server writes
itself (the status panel, the charts, progress and errors) is translated here,
from the request's Accept-Language header, which the browser fills from the
same language setting. Nothing here imports Gradio at module level, so the
terminal client can use the panel's words too.
"""

from __future__ import annotations

LANGS = ("en", "zh")

EN: dict[str, str] = {
    # page
    "title": "# 🎙️ VibeVoice: long-form, multi-speaker speech on every GPU",
    "tab_generate": "Generate",
    "intro": (
        "Write a script with up to four speakers (`Speaker 1: ...`), pick a voice for "
        "each, and press Generate. Audio plays while it is made; the complete file "
        "is below when it is done."
    ),
    "script": "Script",
    "script_placeholder": "Speaker 1: Hello and welcome.\nSpeaker 2: Thanks, glad to be here.",
    "speakers": "Number of speakers",
    "speaker_voice": "Speaker {n} voice",
    "no_voices": "No voice presets yet: without a sample this speaker speaks in the "
    'model\'s own voice. Add one under "Add a voice" or in the voices folder.',
    "settings": "Generation settings",
    "cfg_scale": "CFG scale (guidance)",
    "steps": "Diffusion steps",
    "seed": "Seed (-1 = random)",
    "generate": "🎵 Generate",
    "stop": "⏹ Stop",
    "live_audio": "Live audio (plays while it is made)",
    "complete_audio": "Complete audio (download)",
    "status": "Status",
    "examples": "Examples",
    "voices": "Add a voice",
    "voice_file": "Voice sample (a few seconds of clear speech)",
    "voice_name": "Voice name",
    "add_voice": "➕ Add voice",
    "refresh_voices": "🔄 Refresh voices",
    "charts": "📈 Last minutes",
    # panel
    "panel_title": "🖥️ GPU status",
    "admission": "Waiting in queue: {n}/{max}",
    "state": "State",
    "queue": "Queue",
    "memory": "Memory",
    "util": "Utilisation",
    "restarts": "Restarts",
    "current": "Request",
    "idle": "idle",
    "worker": "Worker",
    "toast.error": "Error",
    "toast.warning": "Warning",
    "toast.info": "Info",
    "no_workers": "No workers.",
    "state.ready": "ready",
    "state.busy": "busy",
    "state.recovering": "recovering",
    "state.starting": "starting",
    "state.failed": "failed: it could not start; retried every 30 s",
    "state.unavailable": "unavailable: the GPU stopped answering, retried every 30 s",
    "state.draining": "draining: finishing its requests, then removed",
    "state.stopped": "stopped",
    # charts
    "chart.util": "Utilisation %",
    "chart.mem": "Memory %",
    "chart.queue": "Queue length",
    "chart.rate": "Audio seconds per second",
    "chart.ago": "{m} min ago",
    "chart.now": "now",
    "chart.empty": "collecting samples...",
    # progress and outcomes
    "waiting": "⏳ Waiting for a free GPU ({n} in the queue)",
    "running": "🎙️ {got:.1f} s of about {est:.0f} s of audio ({pct:.0f}%) on {where}",
    "resumed": " ↪️ resumed from its last step",
    "done": "✅ Done: {secs:.1f} s of audio in {wall:.1f} s on {where} (seed {seed})",
    "stopped": "⏹ Stopped after {secs:.1f} s of audio",
    "cut.runaway_cap": " ✂️ Cut at the runaway cap ({factor:g}x the script's estimated "
    "length or its prompt, whichever is longer): the model did not end the speech itself",
    "cut.max_audio": " ✂️ Cut at the length limit (max_audio_s)",
    "cut.context": " ✂️ Cut where the model's context was full",
    "nothing_to_stop": "Nothing to stop in this tab.",
    "stopping": "Stopping this tab's request...",
    "failed": "❌ Failed: {message}",
    "voice_added": "✅ Added voice {name!r}",
    "no_voice_file": "Choose an audio file first.",
    "voice_refused": "❌ {message}",
    # the Jobs tab
    "tab_jobs": "Jobs",
    "jobs_intro": "Long scripts run best as **jobs**: they are written down before they run, "
    "keep running when you close this tab, and finish after a server restart. Results stay "
    "here for download until they expire.",
    "jobs_voices": "Voices, in speaker order",
    "jobs_format": "Format",
    "jobs_submit": "Submit job",
    "jobs_table": "Your jobs",
    "jobs_cancel_id": "Job to cancel or delete",
    "jobs_cancel": "Cancel job",
    "jobs_delete": "Delete job",
    "jobs_files": "Finished results",
    "job_queued": "✅ Job `{id}` queued (about {secs:.0f} s of audio).",
    "job_not_yours": "❌ You have no job `{id}`.",
    "job_cancelled": "⏹️ Job `{id}` cancelled.",
    "job_deleted": "🗑️ Job `{id}` deleted, with its result.",
    "jobs_columns": "job|state|progress|audio|submitted|error",
    "job.queued": "queued",
    "job.running": "running",
    "job.preempted": "paused for a live request",
    "job.moved": "moving to another worker",
    "job.worker_lost": "its worker was lost; resumes",
    "job.done": "done",
    "job.failed": "failed",
    "job.cancelled": "cancelled",
    "job_progress": "{pct:.0f}% ({made:.1f} of ~{est:.0f} s)",
}

ZH: dict[str, str] = {
    "title": "# 🎙️ VibeVoice 多GPU语音合成：长篇、多说话人",
    "tab_generate": "生成",
    "intro": (
        "编写最多四位说话人的脚本（`Speaker 1: ...`），为每位选择声音，然后点击“生成”。"
        "音频边生成边播放；完成后可在下方下载完整音频。"
    ),
    "script": "脚本",
    "script_placeholder": "Speaker 1: 大家好，欢迎收听。\nSpeaker 2: 谢谢，很高兴来到这里。",
    "speakers": "说话人数量",
    "speaker_voice": "说话人 {n} 的声音",
    "no_voices": "还没有预设声音：没有样本时，该说话人使用模型自己的声音。可在“添加声音”或声音文件夹中添加。",
    "settings": "生成设置",
    "cfg_scale": "CFG 系数（引导强度）",
    "steps": "扩散步数",
    "seed": "随机种子（-1 为随机）",
    "generate": "🎵 生成",
    "stop": "⏹ 停止",
    "live_audio": "实时音频（边生成边播放）",
    "complete_audio": "完整音频（下载）",
    "status": "状态",
    "examples": "示例",
    "voices": "添加声音",
    "voice_file": "声音样本（几秒清晰的语音）",
    "voice_name": "声音名称",
    "add_voice": "➕ 添加声音",
    "refresh_voices": "🔄 刷新声音列表",
    "charts": "📈 最近几分钟",
    "panel_title": "🖥️ GPU状态监控",
    "admission": "等待队列: {n}/{max}",
    "state": "状态",
    "queue": "队列",
    "memory": "内存",
    "util": "利用率",
    "restarts": "重启",
    "current": "当前请求",
    "idle": "空闲",
    "worker": "工作进程",
    "toast.error": "错误",
    "toast.warning": "警告",
    "toast.info": "提示",
    "no_workers": "没有工作进程。",
    "state.ready": "就绪",
    "state.busy": "忙碌",
    "state.recovering": "恢复中",
    "state.starting": "启动中",
    "state.failed": "故障：无法启动，每30秒重试",
    "state.unavailable": "不可用：GPU无响应，每30秒重试",
    "state.draining": "排空中：完成手头请求后移除",
    "state.stopped": "已停止",
    "chart.util": "利用率 %",
    "chart.mem": "内存 %",
    "chart.queue": "队列长度",
    "chart.rate": "每秒生成的音频秒数",
    "chart.ago": "{m} 分钟前",
    "chart.now": "现在",
    "chart.empty": "正在采集数据...",
    "waiting": "⏳ 等待空闲的GPU（队列中 {n} 个）",
    "running": "🎙️ 已生成 {got:.1f} 秒，预计约 {est:.0f} 秒（{pct:.0f}%），在 {where}",
    "resumed": " ↪️ 已从上一步继续",
    "done": "✅ 完成：{secs:.1f} 秒音频，用时 {wall:.1f} 秒，在 {where}（种子 {seed}）",
    "stopped": "⏹ 已停止，生成了 {secs:.1f} 秒音频",
    "cut.runaway_cap": " ✂️ 已在失控上限处截断（脚本预计长度或提示长度的 {factor:g} 倍，取较长者）：模型未自行结束",
    "cut.max_audio": " ✂️ 已在长度上限（max_audio_s）处截断",
    "cut.context": " ✂️ 已在模型上下文用尽处截断",
    "nothing_to_stop": "此标签页没有正在进行的请求。",
    "stopping": "正在停止此标签页的请求...",
    "failed": "❌ 失败：{message}",
    "voice_added": "✅ 已添加声音 {name!r}",
    "no_voice_file": "请先选择一个音频文件。",
    "voice_refused": "❌ {message}",
    "tab_jobs": "任务",
    "jobs_intro": "长脚本最好作为**任务**运行：任务在运行前先记录下来，关闭此标签页后仍继续运行，"
    "服务器重启后也会完成。结果在过期前都可在此下载。",
    "jobs_voices": "声音（按说话人顺序）",
    "jobs_format": "格式",
    "jobs_submit": "提交任务",
    "jobs_table": "您的任务",
    "jobs_cancel_id": "要取消或删除的任务",
    "jobs_cancel": "取消任务",
    "jobs_delete": "删除任务",
    "jobs_files": "已完成的结果",
    "job_queued": "✅ 任务 `{id}` 已排队（约 {secs:.0f} 秒音频）。",
    "job_not_yours": "❌ 您没有任务 `{id}`。",
    "job_cancelled": "⏹️ 任务 `{id}` 已取消。",
    "job_deleted": "🗑️ 任务 `{id}` 及其结果已删除。",
    "jobs_columns": "任务|状态|进度|音频|提交时间|错误",
    "job.queued": "排队中",
    "job.running": "运行中",
    "job.preempted": "为实时请求暂停",
    "job.moved": "正迁往另一个工作进程",
    "job.worker_lost": "工作进程丢失，将继续",
    "job.done": "已完成",
    "job.failed": "失败",
    "job.cancelled": "已取消",
    "job_progress": "{pct:.0f}%（{made:.1f} / 约 {est:.0f} 秒）",
}

# A refusal or failure from the server: its code in the page's words, then the
# server's own (English) message, which names the exact field or limit.
ZH_ERRORS: dict[str, str] = {
    "bad_input": "输入有误",
    "out_of_memory": "显存不足",
    "engine_error": "模型出错",
    "worker_lost": "工作进程丢失",
    "cancelled": "已取消",
    "timeout": "超时",
    "overloaded": "服务器繁忙，请稍后再试",
    "unavailable": "服务暂不可用",
    "not_found": "找不到",
    "not_ready": "尚未完成",
    "no_audio": "没有音频",
    "conflict": "状态冲突",
    "idempotency_key_reused": "这个幂等键已用于另一份请求",
    "disk_limit": "超出任务磁盘上限",
    "owner_limit": "超出每个用户的上限",
    "disk_full": "磁盘已满",
    "storage_error": "存储出错",
    "data_dir": "数据目录不可用",
}

TEXTS: dict[str, dict[str, str]] = {"en": EN, "zh": ZH}
assert EN.keys() == ZH.keys(), "every string needs both languages"


def explain(lang: str, code: str, message: str) -> str:
    """A server error for the page: as it is in English; in Chinese, what its code
    means first (the message names the field or limit, and stays as the API says it)."""
    said = ZH_ERRORS.get(code) if lang == "zh" else None
    return f"{said}：{message}" if said else message


def t(lang: str, key: str, **values) -> str:
    """The string `key` in `lang` (English when unknown), formatted with `values`."""
    text = TEXTS.get(lang, EN).get(key) or EN[key]
    return text.format(**values) if values else text


def pick_language(accept_language: str | None) -> str:
    """'zh' or 'en' from an Accept-Language header, honouring q-values; default 'en'."""
    best, best_q = "en", -1.0
    for i, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        base = tag.strip().lower().split("-")[0]
        # earlier tags win ties, as the header lists them in preference order
        if base in LANGS and q > best_q and q > 0:
            best, best_q = base, q - i * 1e-6
    return best


def language_of(request) -> str:
    """The language of a gr.Request (or a Starlette request); 'en' without one."""
    headers = getattr(request, "headers", None)
    if headers is None:
        return "en"
    return pick_language(headers.get("accept-language"))


def gradio_i18n():
    """A gr.I18n with the component labels; the browser picks by navigator.language."""
    import gradio as gr

    def labels(lang: str) -> dict[str, str]:
        out = dict(TEXTS[lang])
        for n in range(1, 5):  # a component label cannot be formatted: one key each
            out[f"speaker_voice_{n}"] = t(lang, "speaker_voice", n=n)
        return out

    en, zh = labels("en"), labels("zh")
    return gr.I18n(en=en, zh=zh, **{"zh-CN": zh, "zh-TW": zh})
